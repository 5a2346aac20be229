//! Group flushing of new files for the local store.
//!
//! A new object must be on disk before it gets its name. Flushing each file
//! on its own (`fsync`) costs several dependent disk requests: the data, the
//! inode, the metadata attribute's block, then a cache flush, each a round
//! trip to the device (and on a virtual disk each request is a VM exit).
//! `syncfs` writes every dirty file of the filesystem in one pass, merging
//! neighbouring blocks, and flushes the device cache, so files written
//! together can share it (followed by one `fdatasync`, see [`syncfs`]). Measured here with a standalone writer (20 KB
//! files with their attribute): `fsync` per file 184 us CPU and 4.0 disk
//! writes per file; one `syncfs` for 4 files 94 us and 2.2 writes, for 8
//! files 72 us and 1.2 writes.
//!
//! [`GroupFlush::flush`] is called by each writer with its new file. The
//! first writer of a batch leads it: when writes come fast (the last two
//! arrived less than [`WINDOW`] apart) it waits up to [`WINDOW`] for
//! [`BATCH`] writers to join, then calls `syncfs` once for all of them.
//! Writers that arrive while that flush runs form the next batch. A writer
//! that comes alone (after a pause longer than the window) flushes at once,
//! so an occasional event pays no wait. Under the load benchmark (about
//! 300 outputs per second) batches hold about five files.
//!
//! Writers on their way can say so ([`GroupFlush::expect`]): an invocation
//! does while its image is made. A leader then stops waiting once no
//! announced writer is left to come and no unannounced one (an upload)
//! arrived within the window, so the last output of a burst, or one made
//! while the others in flight fail or write elsewhere, is flushed at once
//! instead of after the rest of the window. Without it, the last batch of
//! the load benchmark waited up to 10 ms for writers that would never come.
//!
//! A writer that names its file once it is on disk passes that step to
//! [`GroupFlush::flush_then`]: the leader runs every member's step after the
//! batch's flush, then flushes once more for the new names, and wakes each
//! member once with its own outcome. (Each writer flushing its folder on
//! its own cost every write a second wait and wake-up, and the folder's
//! open, `statx`, `fstatfs` and close.)
//!
//! Errors: `syncfs` reports any writeback error on the filesystem since the
//! leader's file was opened, and every member of the batch gets that
//! outcome. Each member's file is then checked for a writeback error in its
//! own data since it was opened (`sync_file_range`), whoever wrote it back,
//! before its next step runs. A file on another filesystem than the open
//! batch's (a bucket folder that is a mount point) is flushed on its own
//! with `fsync`, and so is a file on a filesystem where `syncfs` does not
//! make it durable (see [`syncfs_covers`]); its next step then runs on the
//! writer's own thread and the names are left to the caller to flush.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// How long a leader waits for more writers when writes come fast.
pub const WINDOW: Duration = Duration::from_millis(10);
/// A leader stops waiting when this many writers are in its batch.
pub const BATCH: usize = 8;

/// One batch: its members wait on `wake` (with the state's mutex) for the
/// outcome, or to be asked to lead. `Err` holds the OS error code.
#[derive(Default)]
struct Batch {
    outcome: OnceLock<Result<(), i32>>,
    wake: Condvar,
}

struct State {
    /// The batch new writers join; it closes when its flush starts.
    open: Arc<Batch>,
    /// Writers in the open batch.
    members: usize,
    /// The steps the open batch's members take once their files are on
    /// disk (see [`GroupFlush::flush_then`]).
    then: Vec<Then>,
    /// The filesystem (device number) of the open batch's files.
    dev: u64,
    /// Whether a leader is collecting or flushing.
    leading: bool,
    /// When the last writer arrived, and how long after the one before.
    last_arrival: Option<Instant>,
    gap: Duration,
    /// Writers announced through [`GroupFlush::expect`] still on their way.
    expected: usize,
    /// When each announced writer that said it is writing
    /// ([`Expected::writing`]) and has not arrived yet said so, oldest
    /// first: the next arrivals are theirs. One still missing a window
    /// later failed before its flush, and is no longer waited for.
    coming: std::collections::VecDeque<Instant>,
    /// When the last writer nobody announced arrived.
    last_unannounced: Option<Instant>,
}

/// Flushes new files in groups; see the module documentation.
pub struct GroupFlush {
    state: Mutex<State>,
    /// The collecting leader waits here until its batch is full.
    full: Condvar,
    flushes: AtomicU64,
    files: AtomicU64,
    /// Batches whose leader waited out the whole window.
    waited_out: AtomicU64,
    /// Flush every file on its own, as on a filesystem `syncfs` does not
    /// cover (for tests of that path on one it does).
    file_by_file: bool,
}

impl std::fmt::Debug for GroupFlush {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (files, flushes) = self.counts();
        f.debug_struct("GroupFlush")
            .field("files", &files)
            .field("flushes", &flushes)
            .field("waited_out", &self.waited_out())
            .finish()
    }
}

impl Default for GroupFlush {
    fn default() -> Self {
        GroupFlush::new()
    }
}

impl GroupFlush {
    pub fn new() -> Self {
        GroupFlush {
            state: Mutex::new(State {
                open: Arc::default(),
                members: 0,
                then: Vec::new(),
                dev: 0,
                leading: false,
                last_arrival: None,
                gap: Duration::MAX,
                expected: 0,
                coming: std::collections::VecDeque::new(),
                last_unannounced: None,
            }),
            full: Condvar::new(),
            flushes: AtomicU64::new(0),
            files: AtomicU64::new(0),
            waited_out: AtomicU64::new(0),
            file_by_file: false,
        }
    }

    /// A group flush that flushes every file on its own.
    #[cfg(test)]
    pub fn file_by_file() -> Self {
        GroupFlush {
            file_by_file: true,
            ..GroupFlush::new()
        }
    }

    /// Announces a writer on its way, until it calls [`Expected::writing`]
    /// just before it writes, or drops the guard when it turns out it will
    /// not write: see the module documentation.
    pub fn expect(self: &Arc<Self>) -> Expected {
        self.lock().expected += 1;
        Expected {
            flush: Arc::clone(self),
            writing: false,
        }
    }

    /// Files flushed so far, and the disk flushes (`syncfs` or `fsync`
    /// calls, counted once they return) that took them there.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.files.load(Ordering::Relaxed),
            self.flushes.load(Ordering::Relaxed),
        )
    }

    /// Batches whose leader waited the whole [`WINDOW`] for writers that
    /// did not come.
    pub fn waited_out(&self) -> u64 {
        self.waited_out.load(Ordering::Relaxed)
    }

    /// Returns once `file`'s bytes and attributes are on disk (not a name:
    /// the caller links or renames it afterwards, or lets
    /// [`GroupFlush::flush_then`] do it).
    pub fn flush(&self, file: &std::fs::File) -> io::Result<()> {
        self.join(file, None).map(drop)
    }

    /// Flushes `file` like [`GroupFlush::flush`], then runs `then` (which
    /// names it) once its bytes are on disk and free of writeback errors,
    /// and returns `then`'s result once what `then` did is on disk too. The
    /// flag says whether it is: `false` for a file flushed on its own (see
    /// the module documentation), where the caller flushes the new name's
    /// folder itself. `then` is not run when the flush fails.
    ///
    /// `then` may run on another writer's thread, while this one waits, and
    /// while the writers of the next batch wait for it: it must not flush
    /// through this `GroupFlush` or wait for anything a writer may hold
    /// (such as the local store's lock on a key). A `then` that panics is
    /// an error for its own writer only.
    pub fn flush_then<T: Send + 'static>(
        &self,
        file: &std::fs::File,
        then: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<(T, bool)> {
        let fd = file.as_raw_fd();
        let slot = Arc::new(Mutex::new(None));
        let filled = Arc::clone(&slot);
        let step: Then = Box::new(move || {
            // The writer keeps `fd` open until it has its outcome, which
            // is set only after every step of its batch has run. A panic
            // leaves the slot empty: an error for this writer alone.
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                writeback_error(fd).map(|()| then())
            }));
            if let Ok(result) = ran {
                *filled.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
            }
        });
        match self.join(file, Some(step))? {
            // Flushed on its own: the step runs here.
            Some(step) => {
                step();
                Ok((take_result(&slot)?, false))
            }
            None => Ok((take_result(&slot)?, true)),
        }
    }

    /// Flushes `file` with a batch and has its leader run `step`; gives
    /// `step` back when the file was flushed on its own instead.
    fn join(&self, file: &std::fs::File, step: Option<Then>) -> io::Result<Option<Then>> {
        let dev = file.metadata()?.dev();
        let covered = !self.file_by_file && syncfs_covers(file)?;
        self.files.fetch_add(1, Ordering::Relaxed);
        let mut state = self.lock();
        let now = Instant::now();
        forget_missing(&mut state.coming, now);
        if state.coming.pop_front().is_some() {
            if state.coming.is_empty() && state.expected == 0 {
                // The last announced writer: a collecting leader need not
                // wait any longer.
                self.full.notify_one();
            }
        } else {
            state.last_unannounced = Some(now);
        }
        if !covered || (state.members > 0 && state.dev != dev) {
            drop(state);
            self.counted(file.sync_all())?;
            return match step {
                Some(step) => Ok(Some(step)),
                None => wait_for_writeback(file).map(|()| None),
            };
        }
        state.gap = state
            .last_arrival
            .map_or(Duration::MAX, |last| now.saturating_duration_since(last));
        state.last_arrival = Some(now);
        state.members += 1;
        state.dev = dev;
        let named = step.is_some();
        state.then.extend(step);
        let batch = Arc::clone(&state.open);
        if state.members == BATCH {
            self.full.notify_one();
        }
        // A step checks its file itself, before it runs.
        let finish = |outcome: Result<(), i32>| -> io::Result<Option<Then>> {
            outcome.map_err(io::Error::from_raw_os_error)?;
            if !named {
                wait_for_writeback(file)?;
            }
            Ok(None)
        };
        loop {
            if let Some(&outcome) = batch.outcome.get() {
                drop(state);
                return finish(outcome);
            }
            if !state.leading {
                // No leader: this writer's batch is still the open one
                // (a batch only closes when its leader starts flushing).
                state.leading = true;
                state = self.collect(state);
                let batch = std::mem::take(&mut state.open);
                let steps = std::mem::take(&mut state.then);
                state.members = 0;
                drop(state);
                let outcome = self.flush_batch(file, steps);
                // Set once: only the leader of a closed batch sets it.
                let _ = batch.outcome.set(outcome);
                let mut state = self.lock();
                state.leading = false;
                // Wake this batch's members, and one writer of the next
                // batch (if any) to lead it.
                batch.wake.notify_all();
                state.open.wake.notify_one();
                drop(state);
                return finish(outcome);
            }
            state = batch
                .wake
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Flushes a closed batch through the leader's `file`, runs its members'
    /// steps, and flushes again for what they did.
    fn flush_batch(&self, file: &std::fs::File, steps: Vec<Then>) -> Result<(), i32> {
        self.counted(syncfs(file))?;
        if steps.is_empty() {
            return Ok(());
        }
        for step in steps {
            step();
        }
        self.counted(syncfs(file))
    }

    /// Counts a finished disk flush.
    fn counted<T>(&self, flushed: T) -> T {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        flushed
    }

    /// When the last two writers arrived less than [`WINDOW`] apart, waits
    /// up to [`WINDOW`] for the open batch to reach [`BATCH`] writers, or
    /// until nobody is left to come: no announced writer on its way, and
    /// no unannounced one within the window.
    fn collect<'a>(&self, mut state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        if state.gap >= WINDOW {
            return state;
        }
        let deadline = Instant::now() + WINDOW;
        while state.members < BATCH {
            let now = Instant::now();
            if now >= deadline {
                self.waited_out.fetch_add(1, Ordering::Relaxed);
                break;
            }
            forget_missing(&mut state.coming, now);
            if state.expected == 0
                && state.coming.is_empty()
                && !recent(state.last_unannounced, now)
            {
                break;
            }
            state = self
                .full
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        state
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing that runs with the lock held can panic, so a poisoned
        // lock still guards a consistent state.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Drops the writers that said they were writing a window or more before
/// `now` and never came (their write failed before its flush).
fn forget_missing(coming: &mut std::collections::VecDeque<Instant>, now: Instant) {
    while coming
        .front()
        .is_some_and(|&at| now.saturating_duration_since(at) >= WINDOW)
    {
        coming.pop_front();
    }
}

/// Whether `at` is less than [`WINDOW`] before `now`.
fn recent(at: Option<Instant>, now: Instant) -> bool {
    at.is_some_and(|at| now.saturating_duration_since(at) < WINDOW)
}

/// A writer on its way to a [`GroupFlush`]; see [`GroupFlush::expect`].
pub struct Expected {
    flush: Arc<GroupFlush>,
    writing: bool,
}

impl Expected {
    /// The writer is about to write: its next flush is the one announced.
    pub fn writing(mut self) {
        self.writing = true;
    }
}

impl std::fmt::Debug for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Expected")
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        let mut state = self.flush.lock();
        state.expected = state.expected.saturating_sub(1);
        if self.writing {
            state.coming.push_back(Instant::now());
        }
        if state.expected == 0 {
            // A collecting leader waits on `full`.
            self.flush.full.notify_one();
        }
    }
}

/// A member's step after its batch's flush (see [`GroupFlush::flush_then`]).
type Then = Box<dyn FnOnce() + Send>;

/// The result a member's step left in `slot`.
fn take_result<T>(slot: &Mutex<Option<io::Result<T>>>) -> io::Result<T> {
    slot.lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .unwrap_or_else(|| {
            Err(io::Error::other(
                "the step after the flush stopped unexpectedly",
            ))
        })
}

/// The filesystem holding `file`.
pub(super) fn filesystem(file: &std::fs::File) -> io::Result<libc::statfs> {
    // SAFETY: `statfs` is plain data, for which all zeroes is a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open and `stat` is a valid, writable statfs.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat)
}

/// Whether one `syncfs` makes a file on `fs` durable: on ext2/3/4, XFS and
/// Btrfs it writes and flushes everything (tmpfs has nothing to write).
/// FUSE has no such hook (its servers are asked to sync per file), and
/// network filesystems vary, so files elsewhere get their own `fsync`.
fn syncfs_durable(fs: &libc::statfs) -> bool {
    local_disk_or_tmpfs(fs)
}

/// Whether `fs` is ext2/3/4, XFS, Btrfs or tmpfs: a filesystem whose pages
/// and flushes are the kernel's own, with no server or daemon behind them
/// (and no layer over another filesystem).
pub(super) fn local_disk_or_tmpfs(fs: &libc::statfs) -> bool {
    matches!(
        fs.f_type,
        libc::EXT4_SUPER_MAGIC
            | libc::XFS_SUPER_MAGIC
            | libc::BTRFS_SUPER_MAGIC
            | libc::TMPFS_MAGIC
    )
}

/// Whether one `syncfs` makes `file` durable (see [`syncfs_durable`]).
fn syncfs_covers(file: &std::fs::File) -> io::Result<bool> {
    Ok(syncfs_durable(&filesystem(file)?))
}

/// Writes back every dirty file of `file`'s filesystem and flushes the
/// device cache; the error code if a writeback failed since `file` was
/// opened.
///
/// `syncfs` flushes the cache before its last step, which writes the
/// filesystem's own metadata blocks (on ext4 without a journal, among them
/// the blocks holding attributes that do not fit in the inode), so
/// `fdatasync` on `file` (clean by then) follows: it issues one more cache
/// flush, after those writes have completed.
fn syncfs(file: &std::fs::File) -> Result<(), i32> {
    let fd = file.as_raw_fd();
    // SAFETY: the descriptor is open for the duration of both calls.
    let rc = unsafe {
        match libc::syncfs(fd) {
            0 => libc::fdatasync(fd),
            failed => failed,
        }
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    }
}

/// Waits for `file`'s writeback (already done by the batch's flush) and
/// reports a writeback error in its data since it was opened.
fn wait_for_writeback(file: &std::fs::File) -> io::Result<()> {
    writeback_error(file.as_raw_fd())
}

/// [`wait_for_writeback`] for an open descriptor.
fn writeback_error(fd: std::os::unix::io::RawFd) -> io::Result<()> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: callers pass a descriptor they keep open for the duration of
    // the call (a batch member until its outcome is set); offset 0 and
    // length 0 mean the whole file.
    let rc = unsafe { libc::sync_file_range(fd, 0, 0, flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::Path;
    use std::sync::Barrier;

    /// A new file in `dir` holding `bytes`.
    fn new_file(dir: &std::path::Path, name: &str, bytes: &[u8]) -> std::fs::File {
        let mut file = std::fs::File::create(dir.join(name)).unwrap();
        file.write_all(bytes).unwrap();
        file
    }

    /// Sixteen writers, each with a new file `staged{i}` of 4 KiB holding
    /// `i`, call `write` at the same moment; afterwards each file's bytes
    /// are checked under `f{i}`.
    fn sixteen_writers_at_once(write: impl Fn(usize, &Path, std::fs::File) + Sync) {
        let dir = tempfile::tempdir().unwrap();
        let writers = 16;
        let barrier = Barrier::new(writers);
        std::thread::scope(|s| {
            for i in 0..writers {
                let (dir, barrier, write) = (dir.path(), &barrier, &write);
                s.spawn(move || {
                    let file = new_file(dir, &format!("staged{i}"), &[i as u8; 4096]);
                    barrier.wait();
                    write(i, dir, file);
                });
            }
        });
        for i in 0..writers {
            let bytes = std::fs::read(dir.path().join(format!("f{i}"))).unwrap();
            assert_eq!(bytes, vec![i as u8; 4096]);
        }
    }

    fn rename(dir: &Path, i: usize) -> io::Result<()> {
        std::fs::rename(dir.join(format!("staged{i}")), dir.join(format!("f{i}")))
    }

    #[test]
    fn writers_that_arrive_together_share_flushes() {
        if !batches_here() {
            return;
        }
        let flush = GroupFlush::new();
        sixteen_writers_at_once(|i, dir, file| {
            flush.flush(&file).unwrap();
            rename(dir, i).unwrap();
        });
        let (files, flushes) = flush.counts();
        assert_eq!(files, 16);
        // The first writer flushes at once; the others join while it runs
        // and share the next flush (or a few, on a slow machine).
        assert!(flushes < files / 2, "{flushes} flushes for {files} files");
    }

    /// Whether one `syncfs` covers files in a temporary folder here (else
    /// each is flushed on its own and names are left to the caller).
    fn batches_here() -> bool {
        let dir = tempfile::tempdir().unwrap();
        let covered = syncfs_covers(&new_file(dir.path(), "probe", b"x")).unwrap();
        if !covered {
            eprintln!(
                "syncfs does not cover this filesystem: every file is flushed alone; skipped"
            );
        }
        covered
    }

    #[test]
    fn each_writer_gets_its_own_steps_result_after_a_flush_for_the_names() {
        if !batches_here() {
            return;
        }
        let flush = Arc::new(GroupFlush::new());
        sixteen_writers_at_once(|i, dir, file| {
            let dir = dir.to_owned();
            let (value, names_flushed) = flush
                .flush_then(&file, move || rename(&dir, i).map(|()| i))
                .unwrap();
            assert_eq!(value.unwrap(), i, "a writer gets its own step's result");
            assert!(names_flushed);
        });
        let (files, flushes) = flush.counts();
        assert_eq!(files, 16);
        // Two flushes (bytes, names) per batch, and batches are shared.
        assert!(flushes < files, "{flushes} flushes for {files} files");
    }

    #[test]
    fn a_step_comes_between_the_flush_of_the_bytes_and_that_of_the_names() {
        if !batches_here() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let flush = Arc::new(GroupFlush::new());
        let file = new_file(dir.path(), "staged0", b"x");
        let seen = Arc::clone(&flush);
        let (flushes_at_step, names_flushed) =
            flush.flush_then(&file, move || seen.counts().1).unwrap();
        assert!(names_flushed);
        assert_eq!(flushes_at_step, 1, "the bytes' flush had returned");
        assert_eq!(
            flush.counts().1,
            2,
            "the names' flush returned before the writer was told"
        );
        // A writer without a step (a delete's folder) has one flush.
        flush.flush(&file).unwrap();
        assert_eq!(flush.counts().1, 3);
    }

    #[test]
    fn a_step_that_panics_fails_its_writer_and_not_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let flush = GroupFlush::new();
        let file = new_file(dir.path(), "a", b"x");
        let err = flush
            .flush_then(&file, || -> u8 { panic!("a step gone wrong") })
            .unwrap_err();
        assert!(err.to_string().contains("stopped unexpectedly"), "{err}");
        let file = new_file(dir.path(), "b", b"x");
        assert_eq!(flush.flush_then(&file, || 7).unwrap().0, 7);
    }

    #[test]
    fn a_writer_after_a_pause_flushes_alone() {
        let dir = tempfile::tempdir().unwrap();
        let flush = GroupFlush::new();
        for i in 0..3 {
            let file = new_file(dir.path(), &format!("f{i}"), b"x");
            flush.flush(&file).unwrap();
            std::thread::sleep(WINDOW * 2);
        }
        assert_eq!(flush.counts(), (3, 3));
    }

    /// Two writers arrive together, each announced first (`announced[i]`)
    /// or not, while `held` more announced writers are still on their way;
    /// returns how many batches waited out their window.
    fn two_writers_together(announced: [bool; 2], held: usize) -> u64 {
        two_writers_on(&Arc::new(GroupFlush::new()), announced, held)
    }

    /// [`two_writers_together`] on `flush`, which may have a past.
    fn two_writers_on(flush: &Arc<GroupFlush>, announced: [bool; 2], held: usize) -> u64 {
        let dir = tempfile::tempdir().unwrap();
        let (files, waited) = (flush.counts().0, flush.waited_out());
        let on_the_way: Vec<Expected> = (0..held).map(|_| flush.expect()).collect();
        let barrier = Barrier::new(2);
        std::thread::scope(|s| {
            for (i, announced) in announced.into_iter().enumerate() {
                let (flush, barrier, dir) = (&flush, &barrier, dir.path());
                s.spawn(move || {
                    let intent = announced.then(|| flush.expect());
                    let file = new_file(dir, &format!("f{i}"), b"x");
                    barrier.wait();
                    if let Some(intent) = intent {
                        intent.writing();
                    }
                    flush.flush(&file).unwrap();
                });
            }
        });
        drop(on_the_way);
        assert_eq!(flush.counts().0, files + 2);
        flush.waited_out() - waited
    }

    #[test]
    fn a_leader_does_not_wait_once_every_announced_writer_has_come() {
        if !batches_here() {
            return;
        }
        // The first flushes at once; the second leads the next batch,
        // with nobody left to come: it does not wait for more.
        assert_eq!(two_writers_together([true, true], 0), 0);
    }

    #[test]
    fn a_writer_that_said_it_was_writing_and_never_came_is_not_waited_for_long() {
        if !batches_here() {
            return;
        }
        // Its write failed before its flush: after a window it no longer
        // counts, and two announced writers flush without waiting.
        let flush = Arc::new(GroupFlush::new());
        flush.expect().writing();
        std::thread::sleep(WINDOW * 2);
        assert_eq!(two_writers_on(&flush, [true, true], 0), 0);
    }

    #[test]
    fn a_leader_waits_for_announced_writers_and_after_unannounced_ones() {
        if !batches_here() {
            return;
        }
        // An announced writer still on its way (an image being made) is
        // waited for, up to the window; so are more uploads after one
        // that came unannounced. (A writer held up for a whole window
        // between the barrier and its flush would come as if after a
        // pause, and be flushed at once: such a try is made again.)
        for (announced, held) in [([true, true], 1), ([false, false], 0), ([true, false], 0)] {
            let waited = (0..5)
                .map(|_| two_writers_together(announced, held))
                .find(|&waited| waited > 0);
            assert_eq!(waited, Some(1), "{announced:?} with {held} on the way");
        }
    }

    #[test]
    fn syncfs_is_trusted_only_where_it_makes_files_durable() {
        let dir = tempfile::tempdir().unwrap();
        let file = new_file(dir.path(), "f", b"x");
        let disk = syncfs_durable(&filesystem(&file).unwrap());
        assert_eq!(syncfs_covers(&file).unwrap(), disk);
        if std::path::Path::new("/dev/shm").is_dir() {
            let shm = tempfile::tempdir_in("/dev/shm").unwrap();
            assert!(syncfs_covers(&new_file(shm.path(), "f", b"x")).unwrap());
        }
        // procfs stands for every filesystem not on the list: such files
        // get their own fsync.
        let proc = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(!syncfs_covers(&proc).unwrap());
    }

    #[test]
    fn a_file_on_another_filesystem_is_flushed_on_its_own() {
        let shm = std::path::Path::new("/dev/shm");
        let disk = tempfile::tempdir().unwrap();
        if !shm.is_dir() || disk.path().metadata().unwrap().dev() == shm.metadata().unwrap().dev() {
            return;
        }
        let other = tempfile::tempdir_in(shm).unwrap();
        let flush = GroupFlush::new();
        let barrier = Barrier::new(4);
        std::thread::scope(|s| {
            for i in 0..4 {
                let dir = if i == 3 { other.path() } else { disk.path() };
                let (flush, barrier) = (&flush, &barrier);
                s.spawn(move || {
                    let file = new_file(dir, &format!("f{i}"), b"bytes");
                    barrier.wait();
                    flush.flush(&file).unwrap();
                });
            }
        });
        let (files, flushes) = flush.counts();
        assert_eq!(files, 4);
        assert!(flushes >= 2, "one flush cannot cover two filesystems");
        assert_eq!(std::fs::read(other.path().join("f3")).unwrap(), b"bytes");
    }
}
