//! The output check the wordcount tests share: the committed output as a
//! multiset of lines, against what an independent count of the input
//! predicts.

use std::collections::HashMap;
use std::path::Path;

/// The lines a correct run must produce: `w\t1` … `w\tN` for every word seen N times.
pub fn expected_lines(input: &Path) -> HashMap<String, u64> {
    let mut counts: HashMap<String, u64> = HashMap::new();
    for line in std::fs::read_to_string(input).expect("input").lines() {
        for w in line.split_whitespace() {
            *counts.entry(w.to_string()).or_default() += 1;
        }
    }
    let mut lines = HashMap::new();
    for (w, n) in counts {
        for i in 1..=n {
            lines.insert(format!("{w}\t{i}"), 1);
        }
    }
    lines
}

pub fn output_lines(output: &Path) -> HashMap<String, u64> {
    let mut lines: HashMap<String, u64> = HashMap::new();
    for entry in std::fs::read_dir(output).expect("output dir") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        if name.starts_with('.') || name.starts_with('_') {
            continue;
        }
        for line in std::fs::read_to_string(&path).expect("output file").lines() {
            *lines.entry(line.to_string()).or_default() += 1;
        }
    }
    lines
}

pub fn assert_same_multiset(expected: &HashMap<String, u64>, actual: &HashMap<String, u64>) {
    let missing: Vec<_> = expected
        .iter()
        .filter(|(l, n)| actual.get(*l) < Some(n))
        .take(5)
        .collect();
    let extra: Vec<_> = actual
        .iter()
        .filter(|(l, n)| expected.get(*l).copied().unwrap_or(0) < **n)
        .take(5)
        .collect();
    let total_e: u64 = expected.values().sum();
    let total_a: u64 = actual.values().sum();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "output differs from an independent count: expected {total_e} lines, got {total_a}; missing e.g. {missing:?}; doubled or unexpected e.g. {extra:?}"
    );
}
