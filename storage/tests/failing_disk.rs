//! A local disk that fails under a commit, for real: an ext4 file system on
//! a loop device whose backing file, on a full tmpfs, has holes where the
//! file system's free blocks are. Everything written before the fault is
//! on allocated blocks and keeps working; the first write to a new block
//! (the manifest's data) fails in the kernel, and its fsync reports it.
//!
//! That is the case the commit must not get wrong: the manifest is visible
//! and reads back intact from the page cache, a second fsync even reports
//! success (the kernel has dropped the error), yet its bytes never reached
//! the disk. The commit withdraws it; nothing in this process restores it.
//!
//! Needs root (loop devices, mounts) and e2fsprogs; `scripts/test.sh`
//! runs as root and installs them. Without root it fails, loudly.

use std::path::PathBuf;
use std::process::Command;

use lazarus_storage::{
    CheckpointId, CheckpointStore, Codec, Epoch, ErrorKind, JobId, JobStore, Manifest, WorkerId,
    WorkerSnapshot,
};

fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The tmpfs, the loop device and the ext4 on it; all undone on drop, also
/// when the test fails.
struct FailingDisk {
    dir: tempfile::TempDir,
    loop_dev: Option<String>,
    tmpfs_mounted: bool,
    ext4_mounted: bool,
}

impl FailingDisk {
    /// 64 MiB of ext4 on a loop device backed by a fully written file on a
    /// 96 MiB tmpfs.
    fn new() -> FailingDisk {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the failing-disk tests need root (a tmpfs, a loop device and an ext4 mount); \
             run them as root, as scripts/test.sh does"
        );
        let mut disk = FailingDisk {
            dir: tempfile::tempdir().expect("temp dir"),
            loop_dev: None,
            tmpfs_mounted: false,
            ext4_mounted: false,
        };
        std::fs::create_dir(disk.backing_dir()).expect("make the tmpfs mount point");
        std::fs::create_dir(disk.mount_point()).expect("make the ext4 mount point");
        run(
            "mount the tmpfs",
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=96m", "tmpfs"])
                .arg(disk.backing_dir()),
        );
        disk.tmpfs_mounted = true;
        // Every block written, so that only the holes punched later fail.
        let image = disk.image();
        std::fs::write(&image, vec![0u8; 64 << 20]).expect("write the backing file");
        run(
            "mkfs.ext4",
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "nodiscard"])
                .arg(&image),
        );
        // mkfs zeroes its journal and inode tables by punching holes in an
        // image file: fill them, or the disk fails where it must not.
        densify(&image);
        let dev = run(
            "attach a loop device",
            Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&image),
        );
        disk.loop_dev = Some(dev.trim().to_string());
        disk.mount_ext4();
        disk
    }

    fn mount_ext4(&mut self) {
        run(
            "mount the ext4",
            Command::new("mount")
                .arg(self.device())
                .arg(self.mount_point()),
        );
        self.ext4_mounted = true;
    }

    fn device(&self) -> &str {
        self.loop_dev.as_deref().expect("a loop device is attached")
    }

    fn backing_dir(&self) -> PathBuf {
        self.dir.path().join("backing")
    }

    fn image(&self) -> PathBuf {
        self.backing_dir().join("disk.img")
    }

    fn mount_point(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    fn store_url(&self) -> String {
        format!("file://{}/store", self.mount_point().display())
    }

    /// From now on every write to a block the file system had free fails:
    /// its backing bytes are holes, and the tmpfs has no room to fill them.
    /// The ext4 is unmounted for it (which also drops the block
    /// preallocations of files written so far) and mounted again.
    fn fail_new_blocks(&mut self) {
        run(
            "unmount the ext4",
            Command::new("umount").arg(self.mount_point()),
        );
        self.ext4_mounted = false;
        let dump = run("dumpe2fs", Command::new("dumpe2fs").arg(self.device()));
        let block: u64 = dump
            .lines()
            .find_map(|l| l.strip_prefix("Block size:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("dumpe2fs names the block size");
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for listed in dump
            .lines()
            // A group's free ranges (the superblock's "Free blocks:" is a count).
            .filter_map(|l| l.strip_prefix("  Free blocks: "))
        {
            for range in listed.split(", ").filter(|r| !r.is_empty()) {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                let block = |n: &str| n.parse::<u64>().expect("dumpe2fs lists block numbers");
                ranges.push((block(a), block(b)));
            }
        }
        let mut punched = 0;
        for (a, b) in ranges {
            run(
                "punch a hole",
                Command::new("fallocate")
                    .arg("--punch-hole")
                    .args(["--offset", &(a * block).to_string()])
                    .args(["--length", &((b - a + 1) * block).to_string()])
                    .arg(self.image()),
            );
            punched += b - a + 1;
        }
        assert!(punched > 1000, "only {punched} free blocks punched");
        self.mount_ext4();
        // Fill the tmpfs, so the loop device cannot fill a hole.
        let fill = self.backing_dir().join("fill");
        let mut f = std::fs::File::create(&fill).expect("create the tmpfs filler");
        let chunk = vec![1u8; 1 << 20];
        loop {
            use std::io::Write;
            match f.write_all(&chunk) {
                Ok(()) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("fill the tmpfs: {e}"),
            }
        }
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        // Best effort, in order; a failure is reported, not raised (the test
        // may be failing already).
        let undo = |what: &str, cmd: &mut Command| match cmd.output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("cleanup: {what}: {}", String::from_utf8_lossy(&o.stderr)),
            Err(e) => eprintln!("cleanup: {what}: {e}"),
        };
        if self.ext4_mounted {
            undo(
                "unmount the ext4",
                Command::new("umount").arg(self.mount_point()),
            );
        }
        if let Some(dev) = &self.loop_dev {
            undo(
                "detach the loop device",
                Command::new("losetup").args(["-d", dev]),
            );
            // The detach completes when the last opener (udev's probe, say)
            // closes the device: wait for it, bounded (2 s).
            let backing = format!(
                "/sys/block/{}/loop/backing_file",
                dev.trim_start_matches("/dev/")
            );
            for _ in 0..100 {
                if !std::path::Path::new(&backing).exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        if self.tmpfs_mounted {
            undo(
                "unmount the tmpfs",
                Command::new("umount").arg(self.backing_dir()),
            );
        }
    }
}

/// Rewrites every byte of `path` in place, so no part of it is a hole.
fn densify(path: &std::path::Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open the backing file");
    let len = f.metadata().expect("stat the backing file").len();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = f.read_at(&mut buf, at).expect("read the backing file");
        assert!(n > 0, "the backing file ends early");
        f.write_all_at(&buf[..n], at)
            .expect("rewrite the backing file");
        at += n as u64;
    }
}

fn job_id() -> JobId {
    JobId::new("job").expect("a valid job id")
}

fn worker() -> WorkerId {
    WorkerId::new("w").expect("a valid worker id")
}

/// Writes checkpoint `id`'s one chunk and returns its manifest (not committed).
async fn prepared(job: &JobStore, id: u64) -> Manifest {
    let id = CheckpointId(id);
    let chunk = job
        .write_chunk(
            id,
            &worker(),
            "state",
            vec![id.0 as u8; 64 << 10].into(),
            Codec::None,
        )
        .await
        .expect("write a chunk");
    let mut manifest = Manifest::new(job.job().clone(), id, Epoch(1));
    manifest.workers.insert(
        worker(),
        WorkerSnapshot {
            chunks: vec![chunk],
            metadata: vec![],
        },
    );
    manifest
}

/// Checkpoint 1 committed, checkpoint 2's chunk written and its directories
/// made durable on the way (by committing 1 under the same layout), then the
/// fault, then the commit of 2.
async fn commit_on_failing_disk(disk: &mut FailingDisk) -> (CheckpointStore, JobStore, Manifest) {
    let store = CheckpointStore::open(&disk.store_url()).expect("open the store");
    let job = store.job(job_id());
    let first = prepared(&job, 1).await;
    job.commit(&first).await.expect("commit 1 before the fault");
    let second = prepared(&job, 2).await;
    disk.fail_new_blocks();
    (store, job, second)
}

fn manifest_path(disk: &FailingDisk, id: u64) -> PathBuf {
    disk.mount_point()
        .join(format!("store/jobs/job/manifests/{id:020}.manifest"))
}

fn assert_not_durable(err: &lazarus_storage::StorageError) {
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    let text = err.to_string();
    assert!(
        text.contains("checkpoint 2") && text.contains("could not be made durable"),
        "the error names the checkpoint and what failed: {text}"
    );
}

#[tokio::test]
async fn test_a_manifest_whose_sync_fails_is_removed_and_never_restored() {
    let mut disk = FailingDisk::new();
    let (store, job, second) = commit_on_failing_disk(&mut disk).await;
    let err = job
        .commit(&second)
        .await
        .expect_err("the manifest's sync fails");
    assert_not_durable(&err);
    assert!(err.to_string().contains("it was removed"), "{err}");
    assert!(
        !manifest_path(&disk, 2).exists(),
        "the manifest is gone from the directory"
    );
    // This store, a fresh one, and a claim's reading all find checkpoint 1.
    assert_eq!(
        job.latest().await.expect("latest").checkpoint,
        CheckpointId(1)
    );
    let claim = job
        .claim_epoch_visible(Epoch(2))
        .await
        .expect("claim epoch 2");
    assert!(claim.created);
    assert_eq!(
        job.latest_after_claim(&claim)
            .await
            .expect("latest after the claim"),
        Some(CheckpointId(1))
    );
    let fresh = CheckpointStore::open(&disk.store_url())
        .expect("open the store again")
        .job(job_id());
    assert_eq!(
        fresh
            .latest()
            .await
            .expect("latest of a fresh store")
            .checkpoint,
        CheckpointId(1)
    );
    assert_eq!(store.job(job_id()).list().await.expect("list").len(), 1);
}

#[test]
fn test_the_failing_disk_is_undone() {
    let (mount, image) = {
        let disk = FailingDisk::new();
        (disk.mount_point(), disk.image())
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("read the mount table");
    assert!(
        !mounts.contains(&*mount.to_string_lossy()),
        "still mounted: {}",
        mount.display()
    );
    let loops = run("list loop devices", Command::new("losetup").arg("-a"));
    assert!(
        !loops.contains(&*image.to_string_lossy()),
        "a loop device still backs {}: {loops}",
        image.display()
    );
}
