//! What an agent agrees to do, whoever asks: run worker binaries only from
//! configured directories, hold VIPs only within configured prefixes. The
//! agent runs as root; this is its limit even against a supervisor or an
//! operator it trusts. The interface VIPs go on is the agent's own setting
//! and never comes from a job.
//!
//! A list that is not configured allows anything (and the agent says so at
//! start); a configured one is enforced, and a refusal names the path or
//! address and the list.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// The agent's allow-lists (`allowed_binaries`, `allowed_vips` in its
/// config).
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    /// Directories worker binaries must be in (after resolving symlinks).
    pub binaries: Option<Vec<PathBuf>>,
    /// Prefixes VIPs must be within, as (network, prefix length).
    pub vips: Option<Vec<(IpAddr, u8)>>,
}

/// Parses `198.18.0.0/15` or `2001:2::/48`; errors name the entry.
pub fn parse_prefix(s: &str) -> Result<(IpAddr, u8), String> {
    let (a, p) = s
        .split_once('/')
        .ok_or_else(|| format!("allowed_vips: {s:?} is not a prefix (write 198.18.0.0/15)"))?;
    let addr: IpAddr = a.parse().map_err(|e| format!("allowed_vips: {s:?}: {e}"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 = p
        .parse()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| format!("allowed_vips: {s:?}: prefix length must be 0 to {max}"))?;
    Ok((addr, len))
}

fn bits(a: IpAddr) -> (u128, u8) {
    match a {
        IpAddr::V4(v) => (u128::from(u32::from(v)), 32),
        IpAddr::V6(v) => (u128::from(v), 128),
    }
}

/// Whether `addr/len` lies within `net/net_len`.
fn within(addr: IpAddr, len: u8, net: IpAddr, net_len: u8) -> bool {
    let ((a, width), (n, net_width)) = (bits(addr), bits(net));
    if width != net_width || len < net_len {
        return false;
    }
    if net_len == 0 {
        return true;
    }
    let shift = u32::from(width - net_len);
    (a >> shift) == (n >> shift)
}

impl AllowList {
    /// Whether a job may run `binary` here; the error names it and the list.
    pub fn check_binary(&self, binary: &Path) -> Result<(), String> {
        let Some(dirs) = &self.binaries else {
            return Ok(());
        };
        // Symlinks and `..` resolved: a link from an allowed directory to
        // elsewhere does not count.
        let real = std::fs::canonicalize(binary)
            .map_err(|e| format!("worker binary {}: {e}", binary.display()))?;
        let allowed = dirs
            .iter()
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .any(|d| real.starts_with(&d));
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "worker binary {} is outside this agent's allowed_binaries ({})",
                binary.display(),
                dirs.iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    }

    /// Whether this agent may hold `vip` (`addr/prefix`).
    pub fn check_vip(&self, vip: &str) -> Result<(), String> {
        let Some(nets) = &self.vips else {
            return Ok(());
        };
        let (addr, len) = crate::vip::parse_vip(vip).map_err(|e| e.to_string())?;
        if nets.iter().any(|(n, l)| within(addr, len.max(*l), *n, *l)) {
            Ok(())
        } else {
            Err(format!(
                "VIP {vip} is outside this agent's allowed_vips ({})",
                nets.iter()
                    .map(|(n, l)| format!("{n}/{l}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vips_only_within_the_prefixes() {
        let list = AllowList {
            binaries: None,
            vips: Some(vec![
                parse_prefix("198.18.0.0/15").expect("v4"),
                parse_prefix("2001:2::/48").expect("v6"),
            ]),
        };
        assert!(list.check_vip("198.18.0.100/24").is_ok());
        assert!(list.check_vip("198.19.255.1/32").is_ok());
        assert!(list.check_vip("2001:2::100/64").is_ok());
        let e = list.check_vip("198.20.0.1/24").expect_err("outside");
        assert!(e.contains("VIP 198.20.0.1/24 is outside this agent's allowed_vips (198.18.0.0/15, 2001:2::/48)"), "{e}");
        assert!(list.check_vip("2001:3::1/64").is_err());
        assert!(
            AllowList::default().check_vip("203.0.113.9/24").is_ok(),
            "no list: anything"
        );
        assert!(parse_prefix("198.18.0.0")
            .expect_err("no length")
            .contains("not a prefix"));
        assert!(parse_prefix("198.18.0.0/33")
            .expect_err("too long")
            .contains("0 to 32"));
    }

    #[test]
    fn test_binaries_only_from_the_directories_with_links_resolved() {
        let dir = tempfile::tempdir().expect("dir");
        let (ok_dir, other) = (dir.path().join("bin"), dir.path().join("other"));
        std::fs::create_dir_all(&ok_dir).expect("dir");
        std::fs::create_dir_all(&other).expect("dir");
        std::fs::write(ok_dir.join("w"), "").expect("file");
        std::fs::write(other.join("evil"), "").expect("file");
        std::os::unix::fs::symlink(other.join("evil"), ok_dir.join("link")).expect("link");
        let list = AllowList {
            binaries: Some(vec![ok_dir.clone()]),
            vips: None,
        };
        assert!(list.check_binary(&ok_dir.join("w")).is_ok());
        let e = list.check_binary(&other.join("evil")).expect_err("outside");
        assert!(
            e.contains("is outside this agent's allowed_binaries"),
            "{e}"
        );
        assert!(
            list.check_binary(&ok_dir.join("link")).is_err(),
            "a link out does not count"
        );
        assert!(
            list.check_binary(&ok_dir.join("../other/evil")).is_err(),
            "nor does .."
        );
        assert!(list.check_binary(&ok_dir.join("missing")).is_err());
    }
}
