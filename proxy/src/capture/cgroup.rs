//! Finding where to attach: the cgroup2 mount, read from /proc/self/mounts
//! (on hybrid hosts it is not /sys/fs/cgroup).

use std::path::{Path, PathBuf};

use super::CaptureError;

/// The mount point of the first cgroup2 filesystem in a mounts table.
pub fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

/// /proc/self/mounts escapes spaces and a few other bytes as octal.
fn unescape_mount_path(path: &str) -> String {
    path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// The cgroup to attach to: the override if given (it must be inside a
/// cgroup2 mount), else the root of the cgroup2 mount.
pub fn resolve(override_path: Option<&Path>) -> Result<PathBuf, CaptureError> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|source| CaptureError::Io { what: "reading /proc/self/mounts".into(), source })?;
    let root = cgroup2_mount_in(&mounts).ok_or(CaptureError::NoCgroup2)?;
    match override_path {
        None => Ok(root),
        Some(path) => {
            if !path.join("cgroup.procs").exists() {
                return Err(CaptureError::NotACgroup(path.to_path_buf()));
            }
            Ok(path.to_path_buf())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount_in(mounts), Some(PathBuf::from("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn no_cgroup2_is_none() {
        assert_eq!(cgroup2_mount_in("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn unescapes_spaces() {
        let mounts = "cgroup2 /mnt/my\\040cgroup cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount_in(mounts), Some(PathBuf::from("/mnt/my cgroup")));
    }
}
