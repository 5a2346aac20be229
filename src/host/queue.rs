//! The bounded work queue: events wait here as small jobs (never decoded
//! images), and a fixed number of workers run them.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::journal::{Journal, Pending};
use super::{AppState, new_id};
use crate::cloudfunc::{self, InvocationResult, Status};
use crate::events::Event;
use crate::rules::{EventType, Rule};

/// Invocations in flight per image thread. Of these,
/// [`cloudfunc::IMAGE_SLOTS_PER_WORKER`] may read their sources and wait
/// for the thread (so it finds the next image ready); the others write
/// their outputs and wait for them to be flushed, which on a slow disk can
/// take longer than the image work.
const IN_FLIGHT_PER_WORKER: usize = 16;

/// One invocation waiting to run.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub rule: Arc<Rule>,
    pub event: Event,
    pub enqueued: Instant,
    /// For a job queued again at start: how often it started so (and
    /// never finished) before; its start is written down (see
    /// [`Journal::started`]). One that started before runs alone.
    pub starts: Option<u32>,
    /// Runs before this one that the store failed in a way that may pass:
    /// see [`HostConfig::backend_retries`](super::HostConfig).
    pub retried: usize,
}

impl Job {
    /// Runs with no other queued job beside it: one that started after a
    /// restart and never finished, so that if it stops the process again,
    /// no other job shares the blame.
    fn alone(&self) -> bool {
        self.starts.is_some_and(|n| n > 0)
    }
}

/// The sending side, shared by handlers and workers.
pub struct Queue {
    sender: Mutex<Option<mpsc::Sender<Job>>>,
    bound: usize,
    /// Jobs not yet finished: waiting for room, queued or running. Counted
    /// before a job is sent and after it is done, so no moment between the
    /// two looks idle.
    unfinished: Arc<AtomicUsize>,
    /// Every job sent is written down here first, and marked done after it
    /// ran, so that a restart runs what a killed process left.
    pub(super) journal: Arc<Journal>,
    /// Held shared by every job while it runs, and alone by a job that
    /// must run with no other queued job beside it (see [`resume`]).
    turns: Arc<tokio::sync::RwLock<()>>,
    /// Cancelled when the shutdown begins: jobs waiting to run again after
    /// a store failure stop waiting and are left to the journal.
    closing: tokio_util::sync::CancellationToken,
}

/// Room reserved in the queue for jobs not built yet.
pub struct Reservation {
    permits: Vec<mpsc::OwnedPermit<Job>>,
    unfinished: Arc<AtomicUsize>,
    journal: Arc<Journal>,
}

/// Writes `jobs` down in `journal` as queued.
fn journal_added(journal: &Journal, jobs: &[Job]) -> std::io::Result<()> {
    journal.added(
        jobs.iter()
            .map(|j| (j.id.as_str(), j.rule.id.as_str(), &j.event)),
    )
}

impl Reservation {
    /// Sends `jobs` into the reserved room (at most as many as were
    /// reserved), journaled first. They are sent even where the journal
    /// cannot be written (logged): their object is stored already, and
    /// only a restart before they run would lose them.
    pub fn send(self, mut jobs: Vec<Job>) {
        jobs.truncate(self.permits.len());
        if journal_added(&self.journal, &jobs).is_err() {
            tracing::warn!(
                jobs = jobs.len(),
                "the invocations of a stored object run without a journal entry"
            );
        }
        self.send_now(jobs);
    }

    /// Sends `jobs` only once they are journaled: where the journal cannot
    /// be written, none is sent, and the room goes back.
    fn send_journaled(self, mut jobs: Vec<Job>) -> Result<(), Refused> {
        jobs.truncate(self.permits.len());
        journal_added(&self.journal, &jobs).map_err(|e| Refused::Journal {
            message: e.to_string(),
        })?;
        self.send_now(jobs);
        Ok(())
    }

    fn send_now(self, jobs: Vec<Job>) {
        for (permit, job) in self.permits.into_iter().zip(jobs) {
            self.unfinished.fetch_add(1, Ordering::SeqCst);
            permit.send(job);
        }
    }
}

impl Queue {
    pub fn new(bound: usize, journal: Arc<Journal>) -> (Queue, mpsc::Receiver<Job>) {
        // Within what the channel can count (the command line holds it
        // far lower).
        let bound = bound.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        let (tx, rx) = mpsc::channel(bound);
        (
            Queue {
                sender: Mutex::new(Some(tx)),
                bound,
                unfinished: Arc::default(),
                journal,
                turns: Arc::default(),
                closing: tokio_util::sync::CancellationToken::new(),
            },
            rx,
        )
    }

    /// A turn beside the other jobs, for image work outside the queue
    /// (`/v1/invoke`, `?image`): it waits while a job runs alone (see
    /// [`resume`]). Taken before an image slot, never while holding one.
    pub async fn shared_turn(&self) -> tokio::sync::OwnedRwLockReadGuard<()> {
        self.turns.clone().read_owned().await
    }

    fn sender(&self) -> Option<mpsc::Sender<Job>> {
        self.sender.lock().ok().and_then(|s| s.clone())
    }

    /// Jobs waiting now.
    pub fn depth(&self) -> usize {
        self.sender()
            .map_or(0, |s| self.bound.saturating_sub(s.capacity()))
    }

    /// Reserves room for `n` jobs, all or none.
    pub fn try_reserve(&self, n: usize) -> Result<Reservation, Refused> {
        let unfinished = Arc::clone(&self.unfinished);
        let journal = Arc::clone(&self.journal);
        if n == 0 {
            return Ok(Reservation {
                permits: Vec::new(),
                unfinished,
                journal,
            });
        }
        // More than the queue holds would be refused for ever: retrying
        // cannot help, so the caller is told so.
        if n > self.bound {
            return Err(Refused::TooMany {
                asked: n,
                bound: self.bound,
            });
        }
        let full = |depth| Refused::Full { depth };
        let sender = self.sender().ok_or(full(self.bound))?;
        let mut permits = Vec::with_capacity(n);
        for _ in 0..n {
            // Dropping the permits taken so far gives their room back.
            permits.push(
                sender
                    .clone()
                    .try_reserve_owned()
                    .map_err(|_| full(self.depth()))?,
            );
        }
        Ok(Reservation {
            permits,
            unfinished,
            journal,
        })
    }

    /// Enqueues all of `jobs` or none of them: none when the queue has no
    /// room for all, or when the journal cannot record them.
    pub fn try_push_all(&self, jobs: Vec<Job>) -> Result<(), Refused> {
        self.try_reserve(jobs.len())?.send_journaled(jobs)
    }

    /// True when nothing waits and nothing runs.
    fn idle(&self) -> bool {
        self.unfinished.load(Ordering::SeqCst) == 0
    }

    /// Stops taking new jobs; workers drain what is queued.
    fn close(&self) {
        if let Ok(mut s) = self.sender.lock() {
            s.take();
        }
    }
}

/// Builds the jobs `event` fires, one per matching rule.
pub fn jobs_for(state: &AppState, event: Event) -> Vec<Job> {
    state
        .rules
        .matching(&event.bucket, event.event_type, &event.key)
        .into_iter()
        .map(|rule| Job {
            id: new_id(),
            rule,
            event: event.clone(),
            enqueued: Instant::now(),
            starts: None,
            retried: 0,
        })
        .collect()
}

/// Why the queue did not take a request's jobs.
#[derive(Debug, Clone)]
pub enum Refused {
    /// No room now; `depth` jobs wait.
    Full { depth: usize },
    /// More jobs than the queue ever holds.
    TooMany { asked: usize, bound: usize },
    /// The journal cannot record them (a full disk): taken, they would
    /// be lost to a restart.
    Journal { message: String },
}

/// The worker tasks and the notifications they started.
pub struct Workers {
    tasks: JoinSet<()>,
    deliveries: Arc<Mutex<JoinSet<()>>>,
    /// The jobs whose results are being delivered, by id: each is marked
    /// done in the journal once its delivery ends (delivered, or kept in
    /// the dead-letter file).
    delivering: Delivering,
    state: Arc<AppState>,
}

/// Jobs whose notifications are under way, by id, each with whether it
/// was resumed at start (its done mark is then written at once).
type Delivering = Arc<Mutex<std::collections::HashMap<String, bool>>>;

impl Workers {
    pub fn start(state: Arc<AppState>, receiver: mpsc::Receiver<Job>) -> Workers {
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        let deliveries = Arc::new(Mutex::new(JoinSet::new()));
        let delivering = Delivering::default();
        let mut tasks = JoinSet::new();
        for _ in 0..state.config.workers.max(1) * IN_FLIGHT_PER_WORKER {
            let receiver = receiver.clone();
            let state = state.clone();
            let deliveries = deliveries.clone();
            let delivering = delivering.clone();
            tasks.spawn(async move {
                loop {
                    // One worker at a time waits for a slot, then for a
                    // job: jobs wait in the queue, not in a worker, and an
                    // idle host holds one slot, not all of them (a direct
                    // invocation takes one too).
                    let (job, mut slot) = {
                        let mut rx = receiver.lock().await;
                        let slot = state.runtime.image_slot().await;
                        (rx.recv().await, slot)
                    };
                    let Some(mut job) = job else { break };
                    // The rule as it is now: one removed since the event was
                    // queued no longer applies, one replaced applies as it
                    // now reads, so only to events its new event types and
                    // filters still take.
                    let current = current_rule(&state.rules, &job.rule.id, &job.event);
                    let Some(rule) = current else {
                        tracing::info!(
                            id = %job.id,
                            rule = ?job.rule.id,
                            bucket = ?job.event.bucket,
                            key = ?job.event.key,
                            "skipped: the rule was removed or no longer takes this event \
                             after the event was queued"
                        );
                        state.queue.journal.done(&job.id);
                        state.queue.unfinished.fetch_sub(1, Ordering::SeqCst);
                        continue;
                    };
                    job.rule = rule;
                    // No job waits for its turn holding an image slot: the
                    // job running alone may need one again (to fetch a
                    // watermark), and a slot held by a waiting job would
                    // never come back.
                    let _turn = if job.alone() {
                        drop(slot);
                        let turn = Turn::Alone(state.queue.turns.clone().write_owned().await);
                        slot = state.runtime.image_slot().await;
                        turn
                    } else {
                        match state.queue.turns.clone().try_read_owned() {
                            Ok(turn) => Turn::Shared(turn),
                            Err(_) => {
                                drop(slot);
                                let turn = Turn::Shared(state.queue.shared_turn().await);
                                slot = state.runtime.image_slot().await;
                                turn
                            }
                        }
                    };
                    let resumed = job.starts.is_some();
                    // A panic (a store's client, say) ends this job, not the
                    // worker, and the job still counts as finished: otherwise
                    // every later shutdown would wait out its drain timeout.
                    let (id, rule) = (job.id.clone(), job.rule.id.clone());
                    let run =
                        AssertUnwindSafe(run_job(&state, &deliveries, &delivering, job, slot));
                    let ran = match run.catch_unwind().await {
                        Ok(ran) => ran,
                        Err(panic) => {
                            let message = cloudfunc::panic_message(panic.as_ref());
                            tracing::error!(
                                invocation = %id,
                                rule = ?rule,
                                panic = message,
                                "the invocation stopped unexpectedly (a panic); its result is lost"
                            );
                            Ran::Finished
                        }
                    };
                    match ran {
                        // Marked done when its delivery ends: one killed
                        // meanwhile runs again at the next start, so its
                        // result is not lost.
                        Ran::Handed => {}
                        Ran::Finished => mark_done(&state.queue.journal, &id, resumed),
                        // Still pending, and still unfinished.
                        Ran::Retrying => continue,
                    }
                    state.queue.unfinished.fetch_sub(1, Ordering::SeqCst);
                }
            });
        }
        Workers {
            tasks,
            deliveries,
            delivering,
            state,
        }
    }

    /// Waits (up to `timeout`) until the queue is empty and no job runs,
    /// so that events fired by outputs during the drain still run, then
    /// closes the queue and waits for the notifications in flight.
    pub async fn finish(mut self, timeout: Duration) {
        // Notifications being waited for; kept out here so that a timeout
        // can stop them.
        let mut delivering = JoinSet::new();
        // Jobs waiting to run again stop waiting: the journal keeps them.
        self.state.queue.closing.cancel();
        let wait = async {
            while !self.state.queue.idle() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            self.state.queue.close();
            while self.tasks.join_next().await.is_some() {}
            delivering = take(&self.deliveries);
            while delivering.join_next().await.is_some() {}
        };
        if tokio::time::timeout(timeout, wait).await.is_err() {
            self.state.queue.close();
            // Work and notifications still under way stop here, and the
            // notifications go to the dead-letter file, as undelivered ones
            // do; stopped first, so that none starts meanwhile.
            self.tasks.shutdown().await;
            // Stopped by the timeout, not by themselves: their starts do
            // not count against them.
            self.state.queue.journal.unstart_running(timeout);
            delivering.shutdown().await;
            take(&self.deliveries).shutdown().await;
            let kept = self.state.notifier.abandon_pending().await;
            // Their results are in the dead-letter file now: the jobs are
            // done.
            let stopped = std::mem::take(&mut *lock(&self.delivering));
            for (id, resumed) in stopped {
                mark_done(&self.state.queue.journal, &id, resumed);
            }
            tracing::warn!(
                ?timeout,
                notifications_kept = kept,
                jobs_left = self.state.queue.journal.pending(),
                "shutdown: work still running after the drain timeout; the jobs left \
                 stay in the journal and run at the next start"
            );
        }
        self.state.queue.journal.flush();
    }
}

/// Marks job `id` done in `journal`. A resumed job's mark is written at
/// once: one lost to a kill would count its start against it.
fn mark_done(journal: &Journal, id: &str, resumed: bool) {
    if resumed {
        journal.done_now(id);
    } else {
        journal.done(id);
    }
}

/// A running job's hold on [`Queue::turns`].
enum Turn {
    Shared(#[allow(dead_code)] tokio::sync::OwnedRwLockReadGuard<()>),
    Alone(#[allow(dead_code)] tokio::sync::OwnedRwLockWriteGuard<()>),
}

/// The notifications started so far, leaving an empty set in their place.
fn take(deliveries: &Mutex<JoinSet<()>>) -> JoinSet<()> {
    deliveries
        .lock()
        .map(|mut set| std::mem::take(&mut *set))
        .unwrap_or_default()
}

/// What became of a job [`run_job`] ran.
enum Ran {
    /// Done; its done mark is the worker's to write.
    Finished,
    /// Its result was handed to a delivery, which marks the job done in
    /// the journal when it ends.
    Handed,
    /// The store failed it in a way that may pass: it runs again later
    /// (see [`retry_later`]), still pending and unfinished.
    Retrying,
}

/// Runs `job`; see [`Ran`].
async fn run_job(
    state: &Arc<AppState>,
    deliveries: &Arc<Mutex<JoinSet<()>>>,
    delivering: &Delivering,
    mut job: Job,
    slot: cloudfunc::ImageSlot,
) -> Ran {
    let span = tracing::info_span!(
        "invocation",
        id = %job.id,
        rule = ?job.rule.id,
        bucket = ?job.event.bucket,
        key = ?job.event.key,
    );
    async {
        let waited = job.enqueued.elapsed();
        // A job queued again at start has its start written down as its
        // image work begins, not before: a start that stopped the process
        // is one that ran the image work (a store that hangs at every start
        // does not set a job aside).
        let start = job
            .starts
            .map(|n| (state.queue.journal.clone(), job.id.clone(), n));
        let before_image_work = move || {
            let started = start.map(|(journal, id, starts)| {
                journal.started(&id, starts);
                (journal, id)
            });
            move || {
                if let Some((journal, id)) = started {
                    journal.image_work_ended(&id);
                }
            }
        };
        let mut result = cloudfunc::invoke(
            &state.runtime,
            &job.id,
            &job.rule,
            &job.event,
            slot,
            before_image_work,
        )
        .await;
        // Its wait for an image thread, from the invocation, and in the queue.
        result.queue_ms = ((waited.as_secs_f64() * 1e3 + result.queue_ms) * 100.0).round() / 100.0;
        // Its work is done; a stop while its result is delivered does not
        // count against it.
        if job.starts.is_some() {
            state.queue.journal.work_done(&job.id);
        }
        if result.transient
            && let Some(&delay) = state.config.backend_retries.get(job.retried)
        {
            tracing::warn!(
                error = result.error.as_ref().map(|e| e.message.as_str()).unwrap_or(""),
                retry_in = ?delay,
                "the store failed; the invocation runs again later"
            );
            job.retried += 1;
            retry_later(state, job, delay);
            return Ran::Retrying;
        }
        match result.status {
            Status::Ok => tracing::info!(
                outputs = result.outputs.len(),
                ms = result.duration_ms,
                "done"
            ),
            Status::Skipped => tracing::debug!("skipped by the loop guard"),
            Status::Error => tracing::warn!(
                error = result
                    .error
                    .as_ref()
                    .map(|e| e.message.as_str())
                    .unwrap_or(""),
                "failed"
            ),
        }
        if state.config.embedded {
            fire_output_events(state, &result);
        }
        // A loop-guard skip is not a run of the function: nothing to report.
        if result.status != Status::Skipped
            && let Some(url) = job.rule.notify_url.clone()
        {
            let payload = match serde_json::to_value(&result) {
                Ok(payload) => payload,
                Err(e) => {
                    tracing::error!("cannot serialise result: {e}");
                    return Ran::Finished;
                }
            };
            // Waits while the deliveries under way are at their bound. The
            // job counts as delivering before that wait: a drain timeout
            // that stops this worker meanwhile keeps the payload in the
            // dead-letter file, and the job is then done.
            let resumed = job.starts.is_some();
            let (id, delivering) = (job.id.clone(), delivering.clone());
            lock(&delivering).insert(id.clone(), resumed);
            let registered = state.notifier.register(&url, &payload).await;
            let state = state.clone();
            if let Ok(mut set) = deliveries.lock() {
                while set.try_join_next().is_some() {}
                set.spawn(
                    async move {
                        let delivered = state
                            .notifier
                            .deliver_registered(registered, &url, &payload);
                        // Where the payload went is logged where it was given up.
                        if let Err(e) = delivered.await {
                            tracing::debug!("notify failed: {e}");
                        }
                        if lock(&delivering).remove(&id).is_some() {
                            mark_done(&state.queue.journal, &id, resumed);
                        }
                    }
                    .in_current_span(),
                );
                return Ran::Handed;
            }
            lock(&delivering).remove(&job.id);
        }
        Ran::Finished
    }
    .instrument(span)
    .await
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Queues `job` again after `delay`, behind what is queued then. It stays
/// pending in the journal and counted unfinished meanwhile; a shutdown that
/// begins meanwhile ends the wait, and the job runs at the next start.
fn retry_later(state: &Arc<AppState>, mut job: Job, delay: Duration) {
    let state = state.clone();
    tokio::spawn(async move {
        let queued = async {
            tokio::time::sleep(delay).await;
            let permit = state.queue.sender()?.reserve_owned().await.ok()?;
            // Its result reports the time this run waited.
            job.enqueued = Instant::now();
            permit.send(job);
            Some(())
        };
        let closing = state.queue.closing.clone();
        let queued = tokio::select! {
            queued = queued => queued.is_some(),
            () = closing.cancelled() => false,
        };
        if !queued {
            state.queue.unfinished.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("shutting down: a job waiting to run again is left in the journal");
        }
    });
}

/// Objects written to the embedded store fire `create_object` like uploads
/// do, so rules can chain; the loop guard keeps a rule off its own outputs.
/// The object is already stored, so its event is not refused when the
/// queue is full: it waits for room (off the worker, which must go on to
/// make room), and a shutdown drains it like queued work.
fn fire_output_events(state: &Arc<AppState>, result: &InvocationResult) {
    for out in &result.outputs {
        let mut event = Event::internal(EventType::CreateObject, &out.bucket, &out.key);
        event.size = Some(out.bytes);
        let mut jobs = jobs_for(state, event);
        jobs.retain(|j| !cloudfunc::in_chain(&out.chain, &out.bucket, &j.rule.id));
        if jobs.is_empty() {
            continue;
        }
        let jobs = match state.queue.try_reserve(jobs.len()) {
            Ok(room) => {
                room.send(jobs);
                continue;
            }
            Err(_) => jobs,
        };
        tracing::info!(bucket = ?out.bucket, key = ?out.key,
            "queue full: output event waits for room");
        // Journaled now: a restart runs them if this process cannot (an
        // error is logged, and they still run).
        let _ = journal_added(&state.queue.journal, &jobs);
        send_when_room(state, jobs);
    }
}

/// Sends `jobs`, already journaled, as room comes (off the caller, which
/// may be a worker that must go on to make room); a shutdown waits for
/// them like queued work, and those it stops stay in the journal.
fn send_when_room(state: &AppState, jobs: Vec<Job>) {
    let Some(sender) = state.queue.sender() else {
        tracing::warn!(
            jobs = jobs.len(),
            "shutting down: jobs left in the journal for the next start"
        );
        return;
    };
    // Unfinished from now: a shutdown waits for these jobs too.
    let unfinished = Arc::clone(&state.queue.unfinished);
    unfinished.fetch_add(jobs.len(), Ordering::SeqCst);
    tokio::spawn(async move {
        for job in jobs {
            match sender.reserve().await {
                Ok(permit) => permit.send(job),
                Err(_) => {
                    unfinished.fetch_sub(1, Ordering::SeqCst);
                    tracing::warn!(key = ?job.event.key,
                        "shutting down: job left in the journal for the next start");
                }
            }
        }
    });
}

/// Queues again the jobs the journal held at start (a killed process's, or
/// those a shutdown's drain timeout stopped), under their rules as they are
/// now; a job whose rule is gone is dropped, with a warning, and marked done.
pub fn resume(state: &AppState, pending: Vec<Pending>) {
    if pending.is_empty() {
        return;
    }
    let (mut alone, mut jobs) = (Vec::new(), Vec::with_capacity(pending.len()));
    for p in pending {
        if p.starts >= super::journal::MAX_STARTS {
            tracing::error!(
                id = %p.id,
                rule = ?p.rule,
                bucket = ?p.event.bucket,
                key = ?p.event.key,
                starts = p.starts,
                "a job left from the last runs is dropped, not run again: it started \
                 after {} restarts and never finished, so it may be what stopped the \
                 server; it is kept in .imgfunc/dropped.jsonl",
                p.starts
            );
            state.queue.journal.drop_job(&p);
            continue;
        }
        match current_rule(&state.rules, &p.rule, &p.event) {
            // One that started once and never finished runs alone, first.
            Some(rule) => (if p.starts > 0 { &mut alone } else { &mut jobs }).push(Job {
                id: p.id,
                rule,
                event: p.event,
                enqueued: Instant::now(),
                starts: Some(p.starts),
                retried: 0,
            }),
            None => {
                tracing::warn!(
                    id = %p.id,
                    rule = ?p.rule,
                    bucket = ?p.event.bucket,
                    key = ?p.event.key,
                    "a job left from the last run is dropped: its rule is gone or no longer takes \
                     this event"
                );
                state.queue.journal.done(&p.id);
            }
        }
    }
    tracing::info!(
        jobs = alone.len() + jobs.len(),
        alone = alone.len(),
        "running the jobs the last run left unfinished"
    );
    alone.append(&mut jobs);
    send_when_room(state, alone);
}

/// The rule `id` of the event's bucket as it reads now, if it still takes
/// the event: a rule replaced under the same id runs with its new
/// arguments, and only on events its new event types and filters match.
fn current_rule(rules: &crate::rules::RuleBook, id: &str, event: &Event) -> Option<Arc<Rule>> {
    rules
        .rules(&event.bucket)
        .into_iter()
        .find(|r| r.id == id && r.matches(event.event_type, &event.key))
}
