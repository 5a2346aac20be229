//! The journal of accepted invocations: every job the queue takes is
//! written down before its event is answered, and marked done once it has
//! run, so that jobs a killed process or a shutdown's drain timeout left
//! behind run when the host starts again.
//!
//! One JSON line per record in `.imgfunc/pending.jsonl`: `{"op":"add",
//! "id":..,"rule":..,"event":{..}}` when a job is queued, `{"op":"done",
//! "id":..}` when it has run. A request's jobs are appended with one
//! `write`, before it is answered. Done marks are gathered and written
//! [`DONE_BATCH`] bytes at a time (with the next jobs' lines, or when no job
//! is left): a mark lost with a killed process only makes a finished job run
//! again, while a write per job put the journal's page in every one of the
//! store's flushes. Nothing is flushed to disk for the journal's sake: it
//! survives the process being killed, not the machine losing power. The file
//! is rewritten with only the jobs still pending at start and whenever it
//! has grown well past them.
//!
//! A job that stops the process itself (a decoder that aborts, memory the
//! kernel will not give) would otherwise stop every start after it. So a
//! job queued again at start is marked `{"op":"start","id":..}` as it
//! starts, and the count is kept in its `add` line (`"starts":n`). A job
//! found unfinished after one such start is run alone, before the others,
//! so that a second stop points at it; after two it is not run again: it
//! goes to `dropped.jsonl` beside the journal, with an error in the log.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::events::Event;

/// A job found pending at start.
#[derive(Debug, Clone)]
pub struct Pending {
    pub id: String,
    /// The rule's id; its bucket is the event's.
    pub rule: String,
    pub event: Event,
    /// How often it started, queued again at a start, and never finished.
    pub starts: u32,
}

/// Starts after which a job found unfinished is not run again.
pub const MAX_STARTS: u32 = 2;

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Record {
    Add {
        id: String,
        rule: String,
        event: Event,
        #[serde(default, skip_serializing_if = "is_zero")]
        starts: u32,
    },
    Start {
        id: String,
    },
    /// A start that does not count: the job was stopped by a shutdown's
    /// drain timeout, not by itself.
    Unstart {
        id: String,
    },
    Done {
        id: String,
    },
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A job's `add` line.
fn add_line(id: &str, rule: &str, event: &Event, starts: u32) -> Option<String> {
    serde_json::to_string(&Record::Add {
        id: id.to_owned(),
        rule: rule.to_owned(),
        event: event.clone(),
        starts,
    })
    .ok()
}

/// The file is rewritten once it holds this many bytes and four times what
/// the pending jobs take.
const COMPACT_AT: u64 = 4 << 20;

/// Done marks gathered before they are written: about sixty (a mark is 38
/// bytes).
const DONE_BATCH: usize = 2304;

pub struct Journal {
    path: PathBuf,
    /// Held while the journal is open: a second process on the same data
    /// folder would rewrite the file under this one.
    _lock: File,
    inner: Mutex<Inner>,
}

/// Takes an exclusive lock on `<path>.lock`, or fails naming the folder
/// another process holds.
fn lock_beside(path: &Path) -> std::io::Result<File> {
    use std::os::fd::AsRawFd;
    let lock_path = path.with_extension("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)?;
    // SAFETY: flock on a file descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Err(std::io::Error::other(format!(
                "another process serves from this data folder ({} is locked)",
                lock_path.display()
            )));
        }
        return Err(e);
    }
    Ok(file)
}

struct Inner {
    /// `None` after a failure to open or rewrite it: jobs still run, and
    /// the failure was logged.
    file: Option<File>,
    /// The `add` line of each pending job and its place in the queue's
    /// order, by id.
    pending: HashMap<String, (u64, String)>,
    /// The next job's place.
    next: u64,
    /// Bytes in the file.
    written: u64,
    /// Done marks not written yet.
    done: String,
    /// Jobs marked started in this run, with their count before and,
    /// while their image work runs, when it started.
    started: HashMap<String, (u32, Option<Instant>)>,
    /// The last write failed part-way: the next starts a line of its own.
    broken: bool,
}

impl Journal {
    /// Opens the journal at `path` and returns the jobs it holds that never
    /// finished, in the order they were queued; the file is rewritten with
    /// only those. A line that does not parse (a write cut short by a kill)
    /// is skipped.
    pub fn open(path: &Path) -> std::io::Result<(Journal, Vec<Pending>)> {
        let lock = lock_beside(path)?;
        let mut order = Vec::new();
        let mut pending: HashMap<String, Pending> = HashMap::new();
        let text = match std::fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        // Lines as bytes: one cut inside a character is skipped like any
        // other damaged line.
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            match serde_json::from_slice::<Record>(line) {
                Ok(Record::Add {
                    id,
                    rule,
                    event,
                    starts,
                }) => {
                    order.push(id.clone());
                    let job = Pending {
                        id: id.clone(),
                        rule,
                        event,
                        starts,
                    };
                    pending.insert(id, job);
                }
                Ok(Record::Start { id }) => {
                    if let Some(job) = pending.get_mut(&id) {
                        job.starts = job.starts.saturating_add(1);
                    }
                }
                Ok(Record::Unstart { id }) => {
                    if let Some(job) = pending.get_mut(&id) {
                        job.starts = job.starts.saturating_sub(1);
                    }
                }
                Ok(Record::Done { id }) => {
                    pending.remove(&id);
                }
                Err(e) => {
                    tracing::warn!(journal = %path.display(), "skipped a damaged line: {e}")
                }
            }
        }
        let mut jobs = Vec::with_capacity(pending.len());
        let mut lines = HashMap::with_capacity(pending.len());
        for id in order {
            let Some(job) = pending.remove(&id) else {
                continue;
            };
            if let Some(line) = add_line(&job.id, &job.rule, &job.event, job.starts) {
                lines.insert(id, (lines.len() as u64, line));
            }
            jobs.push(job);
        }
        let journal = Journal {
            path: path.to_path_buf(),
            _lock: lock,
            inner: Mutex::new(Inner {
                file: None,
                next: lines.len() as u64,
                pending: lines,
                written: 0,
                done: String::new(),
                started: HashMap::new(),
                broken: false,
            }),
        };
        {
            let mut inner = journal.lock();
            let (file, size) = match journal.rewrite(&inner.pending) {
                Ok(rewritten) => rewritten,
                // A full disk: the file is used as it is, so that the
                // server starts (and space can be freed through it).
                Err(e) if !text.is_empty() => {
                    let _ = std::fs::remove_file(path.with_extension("jsonl.tmp"));
                    let file = OpenOptions::new().append(true).open(path)?;
                    tracing::warn!(
                        journal = %path.display(),
                        "cannot rewrite the journal of pending invocations ({e}); \
                         appending to it as it is"
                    );
                    // A last line cut short is ended, so the next starts
                    // a line of its own.
                    inner.broken = !text.ends_with(b"\n");
                    (file, text.len() as u64)
                }
                Err(e) => return Err(e),
            };
            inner.written = size;
            inner.file = Some(file);
        }
        Ok((journal, jobs))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the `add` lines of the pending jobs, in the queue's order, to
    /// a new file put in place of the journal, open for appending, and its
    /// size.
    fn rewrite(&self, pending: &HashMap<String, (u64, String)>) -> std::io::Result<(File, u64)> {
        let mut lines: Vec<&(u64, String)> = pending.values().collect();
        lines.sort_unstable_by_key(|(place, _)| *place);
        let mut text = String::new();
        for (_, line) in lines {
            text.push_str(line);
            text.push('\n');
        }
        let tmp = self.path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, &text)?;
        std::fs::rename(&tmp, &self.path)?;
        let file = OpenOptions::new().append(true).open(&self.path)?;
        Ok((file, text.len() as u64))
    }

    /// Records jobs just queued: `(id, rule id, event)`. Where the write
    /// fails (a full disk), none of them is recorded, and the error says
    /// why: the caller must not take them as queued.
    pub fn added<'a>(
        &self,
        jobs: impl Iterator<Item = (&'a str, &'a str, &'a Event)>,
    ) -> std::io::Result<()> {
        let mut inner = self.lock();
        let mut text = String::new();
        let mut ids = Vec::new();
        for (id, rule, event) in jobs {
            let Some(line) = add_line(id, rule, event, 0) else {
                continue;
            };
            text.push_str(&line);
            text.push('\n');
            let place = inner.next;
            inner.next += 1;
            // Pending before the write: a rewrite it sets off keeps them.
            inner.pending.insert(id.to_owned(), (place, line));
            ids.push(id);
        }
        if ids.is_empty() {
            return Ok(());
        }
        // The done marks gathered so far go in the same write.
        let marks = std::mem::take(&mut inner.done);
        let written = self.append(&mut inner, &format!("{marks}{text}"));
        if written.is_err() {
            inner.done = marks;
            for id in ids {
                inner.pending.remove(id);
            }
        }
        written
    }

    /// Records that the job `id`, queued again at start, starts now, with
    /// `starts` earlier starts: written at once, before its work begins,
    /// and counted in its `add` line for the file's rewrites.
    pub fn started(&self, id: &str, starts: u32) {
        let mut inner = self.lock();
        if !Self::count_in_line(&mut inner, id, starts.saturating_add(1)) {
            return;
        }
        inner
            .started
            .insert(id.to_owned(), (starts, Some(Instant::now())));
        self.mark(&mut inner, "start", id);
    }

    /// Notes that the image work of job `id`, marked started in this run,
    /// has ended (its outputs are being written).
    pub fn image_work_ended(&self, id: &str) {
        if let Some((_, at)) = self.lock().started.get_mut(id) {
            *at = None;
        }
    }

    /// Takes back the start of job `id`, marked started in this run, once
    /// its work is done and only its result's delivery is left: a stop
    /// during the delivery is not the job's doing.
    pub fn work_done(&self, id: &str) {
        let mut inner = self.lock();
        if let Some((before, _)) = inner.started.remove(id)
            && Self::count_in_line(&mut inner, id, before)
        {
            self.mark(&mut inner, "unstart", id);
        }
    }

    /// Takes back the starts of the jobs marked started in this run and
    /// not finished: a shutdown's drain timeout stopped them, not they
    /// themselves. Except for one that ran alone (nothing else ran beside
    /// it) or whose image work has run for `hung_after` (the whole drain):
    /// those keep their start, or one that hangs would be run again at
    /// every start and never set aside. (A store that hangs while the
    /// outputs are written is not the job's doing.)
    pub fn unstart_running(&self, hung_after: Duration) {
        let mut inner = self.lock();
        let started = std::mem::take(&mut inner.started);
        for (id, (before, at)) in started {
            let hung = at.is_some_and(|at| at.elapsed() >= hung_after);
            if before == 0 && !hung && Self::count_in_line(&mut inner, &id, before) {
                self.mark(&mut inner, "unstart", &id);
            }
        }
    }

    /// Sets the start count in the pending job `id`'s `add` line, which
    /// the file's rewrites copy; false when `id` is not pending.
    fn count_in_line(inner: &mut Inner, id: &str, starts: u32) -> bool {
        let Some((place, line)) = inner.pending.get(id) else {
            return false;
        };
        let place = *place;
        if let Ok(Record::Add { rule, event, .. }) = serde_json::from_str::<Record>(line)
            && let Some(line) = add_line(id, &rule, &event, starts)
        {
            inner.pending.insert(id.to_owned(), (place, line));
        }
        true
    }

    /// Writes `{"op":op,"id":id}` at once, with the done marks gathered.
    /// Where the write fails (it is logged), the done marks, this one too
    /// if it is one, are kept for the next write; a start or its taking
    /// back is not written later, out of its order.
    fn mark(&self, inner: &mut Inner, op: &str, id: &str) {
        let line = format!(
            "{{\"op\":\"{op}\",\"id\":{}}}\n",
            serde_json::Value::from(id)
        );
        let mut text = std::mem::take(&mut inner.done);
        text.push_str(&line);
        if self.append(inner, &text).is_err() {
            if op != "done" {
                text.truncate(text.len() - line.len());
            }
            Self::keep_marks(inner, text);
        }
    }

    /// Puts done marks whose write failed back in front of those gathered
    /// since: a mark lost would run its job again after a restart.
    fn keep_marks(inner: &mut Inner, mut marks: String) {
        marks.push_str(&inner.done);
        inner.done = marks;
    }

    /// Records at once that the job `id` has run (for a job whose starts
    /// are counted: a mark lost to a kill would count one against it).
    pub fn done_now(&self, id: &str) {
        let mut inner = self.lock();
        inner.started.remove(id);
        if inner.pending.remove(id).is_none() {
            return;
        }
        self.mark(&mut inner, "done", id);
    }

    /// Takes `job` out of the journal without running it: its `add` line
    /// goes to `dropped.jsonl` beside the journal, so that it is not lost.
    /// Where it cannot be written there, the job stays pending (and is not
    /// run): the next start tries again.
    pub fn drop_job(&self, job: &Pending) {
        let dropped = self.path.with_file_name("dropped.jsonl");
        let kept = add_line(&job.id, &job.rule, &job.event, job.starts)
            .ok_or_else(|| std::io::Error::other("the job cannot be written"))
            .and_then(|line| {
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&dropped)?
                    .write_all(format!("{line}\n").as_bytes())
            });
        match kept {
            // At once: a kill before a gathered mark is written would put
            // the job in the file a second time.
            Ok(()) => self.done_now(&job.id),
            Err(e) => tracing::error!(
                file = %dropped.display(),
                job = ?job,
                "cannot keep the dropped job there; it stays in the journal, not run: {e}"
            ),
        }
    }

    /// Records that the job `id` has run (or will never run): gathered, and
    /// written with others (see the module's notes).
    pub fn done(&self, id: &str) {
        let mut inner = self.lock();
        inner.started.remove(id);
        if inner.pending.remove(id).is_none() {
            return;
        }
        let line = format!(
            "{{\"op\":\"done\",\"id\":{}}}\n",
            serde_json::Value::from(id)
        );
        inner.done.push_str(&line);
        if inner.done.len() < DONE_BATCH && !inner.pending.is_empty() {
            return;
        }
        let marks = std::mem::take(&mut inner.done);
        if self.append(&mut inner, &marks).is_err() {
            Self::keep_marks(&mut inner, marks);
        }
    }

    /// Rewrites the file with only the pending jobs once it has grown past
    /// [`COMPACT_AT`] and four times what they take.
    fn compact(&self, inner: &mut Inner) {
        if inner.written <= COMPACT_AT {
            return;
        }
        let live: u64 = inner
            .pending
            .values()
            .map(|(_, l)| l.len() as u64 + 1)
            .sum();
        if inner.written > live.saturating_mul(4) {
            match self.rewrite(&inner.pending) {
                Ok((file, size)) => {
                    inner.file = Some(file);
                    inner.written = size;
                    inner.broken = false;
                }
                Err(e) => tracing::error!(
                    journal = %self.path.display(),
                    "cannot rewrite the journal of pending invocations: {e}"
                ),
            }
        }
    }

    /// Jobs recorded and not done.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    /// Writes the done marks gathered so far (at shutdown).
    pub fn flush(&self) {
        let mut inner = self.lock();
        let marks = std::mem::take(&mut inner.done);
        if self.append(&mut inner, &marks).is_err() {
            Self::keep_marks(&mut inner, marks);
        }
    }

    /// Appends `text`; a failure is logged and returned.
    fn append(&self, inner: &mut Inner, text: &str) -> std::io::Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        let Some(file) = inner.file.as_mut() else {
            return Ok(());
        };
        let fresh = if inner.broken { "\n" } else { "" };
        let bytes = [fresh.as_bytes(), text.as_bytes()].concat();
        let written = file.write_all(&bytes);
        match &written {
            Ok(()) => {
                inner.written += bytes.len() as u64;
                inner.broken = false;
            }
            Err(e) => {
                // A part written (a full disk) is cut off again; where that
                // fails too, the next write starts a line of its own, so
                // that it is not glued to the part.
                inner.broken = file.set_len(inner.written).is_err();
                tracing::error!(
                    journal = %self.path.display(),
                    "cannot write the journal of pending invocations: {e}"
                );
            }
        }
        self.compact(inner);
        written
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::EventType;

    impl Journal {
        /// What a process started now would find, read from a copy so
        /// that the journal in use is not rewritten.
        fn open_copy(path: &Path) -> (Journal, Vec<Pending>) {
            let copy = path.with_file_name("copy.jsonl");
            std::fs::copy(path, &copy).unwrap();
            Journal::open(&copy).unwrap()
        }
    }

    fn event(key: &str) -> Event {
        Event::internal(EventType::CreateObject, "photos", key)
    }

    #[test]
    fn starts_are_counted_taken_back_after_a_timeout_and_a_dropped_job_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pending.jsonl");
        let (journal, _) = Journal::open(&path).unwrap();
        let (a, b) = (event("a.jpg"), event("b.jpg"));
        journal
            .added([("1", "thumbs", &a), ("2", "thumbs", &b)].into_iter())
            .unwrap();
        let starts = |path: &Path| -> Vec<(String, u32)> {
            let (_, pending) = Journal::open_copy(path);
            pending.into_iter().map(|p| (p.id, p.starts)).collect()
        };
        assert_eq!(starts(&path), [("1".into(), 0), ("2".into(), 0)]);
        // Marked as they start, written at once.
        journal.started("1", 0);
        journal.started("2", 0);
        assert_eq!(starts(&path), [("1".into(), 1), ("2".into(), 1)]);
        // Job 1's work is done: its start is taken back while its result
        // is delivered.
        journal.work_done("1");
        assert_eq!(starts(&path), [("1".into(), 0), ("2".into(), 1)]);
        // Job 1 finishes (its mark at once); a drain timeout stops job 2,
        // whose start is taken back.
        journal.done_now("1");
        journal.unstart_running(Duration::from_secs(60));
        assert_eq!(starts(&path), [("2".into(), 0)]);
        drop(journal);

        // Counted in the add line through the start's rewrite.
        let (journal, pending) = Journal::open(&path).unwrap();
        journal.started("2", pending[0].starts);
        drop(journal);
        let (journal, pending) = Journal::open(&path).unwrap();
        assert_eq!(pending[0].starts, 1);
        // One running alone (started before) keeps its start through a
        // drain timeout: a job that hangs is set aside in the end.
        journal.started("2", 1);
        journal.unstart_running(Duration::from_secs(60));
        assert_eq!(starts(&path), [("2".into(), 2)]);
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("\"starts\":1")
        );
        // Set aside: kept in dropped.jsonl, no longer pending.
        journal.drop_job(&pending[0]);
        assert_eq!(journal.pending(), 0);
        drop(journal);
        let dropped = std::fs::read_to_string(dir.path().join("dropped.jsonl")).unwrap();
        assert!(
            dropped.contains("b.jpg") && dropped.contains("\"starts\":1"),
            "{dropped}"
        );
        assert!(starts(&path).is_empty());
    }

    #[test]
    fn a_job_that_ran_through_the_whole_drain_keeps_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pending.jsonl");
        let (journal, _) = Journal::open(&path).unwrap();
        let (a, b) = (event("a.jpg"), event("b.jpg"));
        journal
            .added([("1", "r", &a), ("2", "r", &b)].into_iter())
            .unwrap();
        let (c, d) = (event("c.jpg"), event("d.jpg"));
        journal
            .added([("3", "r", &c), ("4", "r", &d)].into_iter())
            .unwrap();
        for id in ["1", "2", "3", "4"] {
            journal.started(id, 0);
        }
        // Jobs 1 and 3 began their image work two minutes ago; job 3's
        // ended (its outputs are being written, to a store that hangs).
        let long_ago = Instant::now() - Duration::from_secs(120);
        for id in ["1", "3"] {
            journal.lock().started.get_mut(id).unwrap().1 = Some(long_ago);
        }
        journal.image_work_ended("3");
        journal.image_work_ended("4");
        // A drain of 60 s: job 1's image work ran through it (it hangs);
        // the others were cut short.
        journal.unstart_running(Duration::from_secs(60));
        let (_, pending) = Journal::open_copy(&path);
        let starts: Vec<(&str, u32)> = pending.iter().map(|p| (p.id.as_str(), p.starts)).collect();
        assert_eq!(starts, [("1", 1), ("2", 0), ("3", 0), ("4", 0)]);
    }

    #[test]
    fn jobs_the_file_cannot_take_are_refused_and_the_done_marks_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pending.jsonl");
        let (journal, _) = Journal::open(&path).unwrap();
        let (a, b, c) = (event("a.jpg"), event("b.jpg"), event("c.jpg"));
        journal
            .added([("1", "r", &a), ("2", "r", &b)].into_iter())
            .unwrap();
        journal.done("1");
        // The file stops taking writes (as on a full disk): a handle open
        // for reading only.
        let writable = journal.lock().file.replace(File::open(&path).unwrap());
        assert!(journal.added([("3", "r", &c)].into_iter()).is_err());
        assert_eq!(journal.pending(), 1, "job 3 is not pending");
        // A request that queues nothing is not refused for it.
        assert!(journal.added(std::iter::empty()).is_ok());
        // Done marks whose write fails are kept for the next one: job 1's
        // gathered mark through a failed flush, and job 2's written at once.
        journal.flush();
        journal.done_now("2");
        // Writable again: both marks are written.
        journal.lock().file = writable;
        journal.flush();
        let (_, pending) = Journal::open_copy(&path);
        assert!(pending.is_empty(), "{pending:?}");
    }

    #[test]
    fn a_journal_that_cannot_be_rewritten_at_start_is_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pending.jsonl");
        let (journal, _) = Journal::open(&path).unwrap();
        let (a, b) = (event("a.jpg"), event("b.jpg"));
        journal.added([("1", "r", &a)].into_iter()).unwrap();
        drop(journal);
        // The rewrite's new file cannot be made (as on a full disk).
        std::fs::create_dir(path.with_extension("jsonl.tmp")).unwrap();
        let (journal, pending) = Journal::open(&path).unwrap();
        assert_eq!(pending.len(), 1);
        journal.added([("2", "r", &b)].into_iter()).unwrap();
        journal.done("1");
        drop(journal);
        std::fs::remove_dir(path.with_extension("jsonl.tmp")).unwrap();
        let (_, pending) = Journal::open(&path).unwrap();
        let ids: Vec<&str> = pending.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["2"]);
    }

    #[test]
    fn jobs_not_done_come_back_in_order_and_the_file_keeps_only_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pending.jsonl");
        let (journal, pending) = Journal::open(&path).unwrap();
        assert!(pending.is_empty());
        let (a, b, c) = (event("a.jpg"), event("b.jpg"), event("c.jpg"));
        journal
            .added([("1", "thumbs", &a), ("2", "thumbs", &b)].into_iter())
            .unwrap();
        journal.added([("3", "marks", &c)].into_iter()).unwrap();
        journal.done("2");
        journal.done("unknown");
        assert_eq!(journal.pending(), 2);
        // Done marks are gathered: a kill now would run job 2 again.
        let (_, before_flush) = Journal::open_copy(&path);
        assert_eq!(before_flush.len(), 3);
        drop(journal);
        // A write cut short by a kill leaves a partial line.
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"op\":\"add\",\"id\":\"4\",\"ru")
            .unwrap();
        drop(file);

        let (journal, pending) = Journal::open(&path).unwrap();
        let seen: Vec<(&str, &str, &str)> = pending
            .iter()
            .map(|p| (p.id.as_str(), p.rule.as_str(), p.event.key.as_str()))
            .collect();
        assert_eq!(seen, [("1", "thumbs", "a.jpg"), ("3", "marks", "c.jpg")]);
        assert_eq!(pending[0].event, a);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        journal.done("1");
        journal.done("3");
        // With no job left, the marks are written at once.
        drop(journal);
        let (_, pending) = Journal::open(&path).unwrap();
        assert!(pending.is_empty());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }

    #[test]
    fn one_process_at_a_time_and_damaged_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pending.jsonl");
        let (journal, _) = Journal::open(&path).unwrap();
        let err = Journal::open(&path).err().expect("the second is refused");
        assert!(err.to_string().contains("another process"), "{err}");
        let (a, b) = (event("水印.jpg"), event("b.jpg"));
        journal.added([("1", "r", &a)].into_iter()).unwrap();
        drop(journal);
        // A line cut inside a character (水 is e6 b0 b4), then a write that
        // went on.
        let mut text = std::fs::read(&path).unwrap();
        text.extend_from_slice(b"{\"op\":\"add\",\"id\":\"9\",\"event\":{\"key\":\"\xe6\xb0\n");
        std::fs::write(&path, &text).unwrap();
        let (journal, pending) = Journal::open(&path).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].event, a);
        journal.added([("2", "r", &b)].into_iter()).unwrap();
        drop(journal);
        let (_, pending) = Journal::open(&path).unwrap();
        let ids: Vec<&str> = pending.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["1", "2"], "in the queue's order");
    }

    #[test]
    fn the_file_is_rewritten_once_it_has_grown_past_its_pending_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pending.jsonl");
        let (journal, _) = Journal::open(&path).unwrap();
        let kept = event("kept.jpg");
        journal.added([("kept", "r", &kept)].into_iter()).unwrap();
        let long = event(&"k".repeat(900));
        let size = || std::fs::metadata(&path).unwrap().len();
        let mut rewrites = 0;
        for n in 0..6000 {
            let id = n.to_string();
            let before = size();
            journal
                .added([(id.as_str(), "r", &long)].into_iter())
                .unwrap();
            if size() < before {
                // Rewritten by this very write: the job it added is kept.
                rewrites += 1;
                let (_, pending) = Journal::open_copy(&path);
                let ids: Vec<&str> = pending.iter().map(|p| p.id.as_str()).collect();
                assert_eq!(ids, ["kept", id.as_str()]);
            }
            journal.done(&id);
        }
        assert!(rewrites > 0);
        assert!(size() < COMPACT_AT, "{}", size());
        drop(journal);
        let (_, pending) = Journal::open(&path).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].event, kept);
    }
}
