//! Barrier alignment, as a pure state machine the worker loop drives.
//!
//! A worker with several inputs must snapshot only after barrier `n` has
//! arrived on every input, and must not process anything that follows
//! barrier `n` on an input before that (Chandy–Lamport: nothing in flight
//! crosses the cut). So an input that delivered barrier `n` is *blocked*
//! (not read) until every open input has delivered it. An input that
//! closed counts as aligned for every later barrier.

use lazarus_storage::CheckpointId;

/// Where one input stands in the alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InputState {
    /// Read as usual.
    Open,
    /// Delivered the barrier being aligned: held back.
    Held,
    /// Ended.
    Closed,
}

/// Tracks barrier alignment across a worker's inputs.
#[derive(Debug, Clone)]
pub(crate) struct BarrierAligner {
    blocked: Vec<bool>,
    closed: Vec<bool>,
    aligning: Option<CheckpointId>,
}

impl BarrierAligner {
    pub(crate) fn new(inputs: usize) -> BarrierAligner {
        BarrierAligner {
            blocked: vec![false; inputs],
            closed: vec![false; inputs],
            aligning: None,
        }
    }

    /// Whether input `i` must not be read now.
    pub(crate) fn skip(&self, i: usize) -> bool {
        self.blocked[i] || self.closed[i]
    }

    /// Where input `i` stands.
    pub(crate) fn input(&self, i: usize) -> InputState {
        if self.closed[i] {
            InputState::Closed
        } else if self.blocked[i] {
            InputState::Held
        } else {
            InputState::Open
        }
    }

    /// The barrier being aligned, if one is.
    pub(crate) fn aligning(&self) -> Option<CheckpointId> {
        self.aligning
    }

    /// Barrier `n` was found on every other input by reading ahead (see
    /// `in_flight`): the snapshot is taken now, and every input is read
    /// again.
    pub(crate) fn cut(&mut self, n: CheckpointId) -> Result<(), String> {
        if let Some(m) = self.aligning.filter(|m| *m != n) {
            return Err(format!("cut at barrier {n} while aligning barrier {m}"));
        }
        self.blocked.iter_mut().for_each(|b| *b = false);
        self.aligning = None;
        Ok(())
    }

    /// Barrier `n` arrived on input `i`. Returns `Some(n)` when that
    /// completes alignment: snapshot now, then read every input again.
    pub(crate) fn on_barrier(
        &mut self,
        i: usize,
        n: CheckpointId,
    ) -> Result<Option<CheckpointId>, String> {
        if let Some(m) = self.aligning {
            if m != n {
                return Err(format!(
                    "barrier {n} on input {i} while aligning barrier {m}"
                ));
            }
        }
        if self.blocked[i] {
            return Err(format!("input {i} sent barrier {n} twice"));
        }
        self.aligning = Some(n);
        self.blocked[i] = true;
        Ok(self.complete())
    }

    /// Input `i` closed. Returns `Some(n)` if that completes an alignment.
    pub(crate) fn on_closed(&mut self, i: usize) -> Option<CheckpointId> {
        self.closed[i] = true;
        self.complete()
    }

    fn complete(&mut self) -> Option<CheckpointId> {
        let n = self.aligning?;
        if (0..self.blocked.len()).all(|j| self.blocked[j] || self.closed[j]) {
            self.blocked.iter_mut().for_each(|b| *b = false);
            self.aligning = None;
            Some(n)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_snapshot_only_after_barrier_on_every_input() {
        let mut a = BarrierAligner::new(3);
        assert_eq!(a.on_barrier(0, CheckpointId(4)), Ok(None));
        assert!(a.skip(0), "an aligned input is held back");
        assert!(!a.skip(1) && !a.skip(2));
        assert_eq!(a.on_barrier(2, CheckpointId(4)), Ok(None));
        assert_eq!(a.on_barrier(1, CheckpointId(4)), Ok(Some(CheckpointId(4))));
        assert!(
            !a.skip(0) && !a.skip(1) && !a.skip(2),
            "all inputs flow again"
        );
        // The next checkpoint aligns from scratch.
        assert_eq!(a.on_barrier(1, CheckpointId(5)), Ok(None));
    }

    #[test]
    fn test_single_input_snapshots_at_once() {
        let mut a = BarrierAligner::new(1);
        assert_eq!(a.on_barrier(0, CheckpointId(1)), Ok(Some(CheckpointId(1))));
    }

    #[test]
    fn test_closed_inputs_count_as_aligned() {
        let mut a = BarrierAligner::new(2);
        assert_eq!(a.on_barrier(0, CheckpointId(7)), Ok(None));
        assert_eq!(a.on_closed(1), Some(CheckpointId(7)));
        assert!(a.skip(1), "closed inputs are never read");
        assert_eq!(a.on_barrier(0, CheckpointId(8)), Ok(Some(CheckpointId(8))));
    }

    #[test]
    fn test_mismatched_or_repeated_barriers_are_errors() {
        let mut a = BarrierAligner::new(2);
        a.on_barrier(0, CheckpointId(3)).expect("first");
        assert!(a
            .on_barrier(1, CheckpointId(4))
            .expect_err("mismatch")
            .contains("while aligning barrier 3"));
        assert!(a
            .on_barrier(0, CheckpointId(3))
            .expect_err("twice")
            .contains("twice"));
    }
}
