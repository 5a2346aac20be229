//! The bounded work queue: events wait here as small jobs (never decoded
//! images), and a fixed number of workers run them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::{AppState, new_id};
use crate::cloudfunc::{self, InvocationResult, Status};
use crate::events::Event;
use crate::rules::{EventType, Rule};

/// One invocation waiting to run.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub rule: Arc<Rule>,
    pub event: Event,
    pub enqueued: Instant,
}

/// The sending side, shared by handlers and workers.
pub struct Queue {
    sender: Mutex<Option<mpsc::Sender<Job>>>,
    bound: usize,
}

impl Queue {
    pub fn new(bound: usize) -> (Queue, mpsc::Receiver<Job>) {
        let (tx, rx) = mpsc::channel(bound.max(1));
        (
            Queue {
                sender: Mutex::new(Some(tx)),
                bound: bound.max(1),
            },
            rx,
        )
    }

    fn sender(&self) -> Option<mpsc::Sender<Job>> {
        self.sender.lock().ok().and_then(|s| s.clone())
    }

    /// Jobs waiting now.
    pub fn depth(&self) -> usize {
        self.sender()
            .map_or(0, |s| self.bound.saturating_sub(s.capacity()))
    }

    /// Enqueues all of `jobs` or none of them; `Err` carries the queue depth.
    pub fn try_push_all(&self, jobs: Vec<Job>) -> Result<(), usize> {
        if jobs.is_empty() {
            return Ok(());
        }
        let sender = self.sender().ok_or(self.bound)?;
        let permits = sender
            .try_reserve_many(jobs.len())
            .map_err(|_| self.depth())?;
        for (permit, job) in permits.zip(jobs) {
            permit.send(job);
        }
        Ok(())
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
        })
        .collect()
}

/// The worker tasks and the notifications they started.
pub struct Workers {
    tasks: JoinSet<()>,
    deliveries: Arc<Mutex<JoinSet<()>>>,
    state: Arc<AppState>,
}

impl Workers {
    pub fn start(state: Arc<AppState>, receiver: mpsc::Receiver<Job>) -> Workers {
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        let deliveries = Arc::new(Mutex::new(JoinSet::new()));
        let mut tasks = JoinSet::new();
        for _ in 0..state.config.workers.max(1) {
            let receiver = receiver.clone();
            let state = state.clone();
            let deliveries = deliveries.clone();
            tasks.spawn(async move {
                loop {
                    let job = receiver.lock().await.recv().await;
                    let Some(job) = job else { break };
                    run_job(&state, &deliveries, job).await;
                }
            });
        }
        Workers {
            tasks,
            deliveries,
            state,
        }
    }

    /// Closes the queue and waits (up to `timeout`) for the work to finish.
    pub async fn finish(mut self, timeout: Duration) {
        self.state.queue.close();
        let wait = async {
            while self.tasks.join_next().await.is_some() {}
            let pending = match self.deliveries.lock() {
                Ok(mut set) => std::mem::take(&mut *set),
                Err(_) => JoinSet::new(),
            };
            pending.join_all().await;
        };
        if tokio::time::timeout(timeout, wait).await.is_err() {
            tracing::warn!(
                ?timeout,
                "shutdown: work still running after the drain timeout"
            );
        }
    }
}

async fn run_job(state: &Arc<AppState>, deliveries: &Arc<Mutex<JoinSet<()>>>, job: Job) {
    let span = tracing::info_span!(
        "invocation",
        id = %job.id,
        rule = %job.rule.id,
        bucket = %job.event.bucket,
        key = %job.event.key,
    );
    async {
        let waited = job.enqueued.elapsed();
        let mut result = cloudfunc::invoke(&state.runtime, &job.id, &job.rule, &job.event).await;
        result.queue_ms = (waited.as_secs_f64() * 1e5).round() / 100.0;
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
        if let Some(url) = job.rule.notify_url.clone() {
            let state = state.clone();
            if let Ok(mut set) = deliveries.lock() {
                while set.try_join_next().is_some() {}
                set.spawn(async move { deliver(&state, &url, &result).await }.in_current_span());
            }
        }
    }
    .instrument(span)
    .await
}

/// Objects written to the embedded store fire `create_object` like uploads
/// do, so rules can chain; the loop guard keeps a rule off its own outputs.
fn fire_output_events(state: &Arc<AppState>, result: &InvocationResult) {
    for out in &result.outputs {
        let event = Event::internal(EventType::CreateObject, &out.bucket, &out.key);
        let jobs = jobs_for(state, event);
        if jobs.is_empty() {
            continue;
        }
        if let Err(depth) = state.queue.try_push_all(jobs) {
            tracing::warn!(
                bucket = %out.bucket, key = %out.key, depth,
                "queue full: output event not dispatched"
            );
        }
    }
}

async fn deliver(state: &AppState, url: &str, result: &InvocationResult) {
    let payload = match serde_json::to_value(result) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!("cannot serialise result: {e}");
            return;
        }
    };
    if let Err(e) = state.notifier.deliver(url, &payload).await {
        tracing::warn!("notify failed, kept in the dead-letter file: {e}");
    }
}
