//! The function host: an axum server that takes bucket events, runs the
//! matching rules' cloudfuncs on a bounded pool of workers, writes results to
//! object storage and notifies. It also serves the embedded store's object
//! API, QingStor's `?notification` rule API and the `?image` process API.

mod error;
mod events;
mod journal;
mod objects;
mod queue;

pub use error::ApiError;
pub use queue::Job;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::routing::{get, post};
use tokio::net::TcpListener;

use crate::cloudfunc::{Runtime, Source, SourceConfig, WatermarkSources};
use crate::imaging::Limits;
use crate::notify::{Notifier, NotifyConfig};
use crate::rules::{RuleBook, WatermarkCheck};
use crate::store::ObjectStore;

/// Everything `serve` is configured with.
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub listen: SocketAddr,
    /// The embedded store's root, and where rules and dead letters are kept.
    pub data_dir: PathBuf,
    /// Rule files loaded at start (`functions/*.json`).
    pub functions_dir: Option<PathBuf>,
    /// Image work running at once (off the async runtime). More
    /// invocations are in flight, so their reads and writes overlap it.
    pub workers: usize,
    /// Invocations that may wait; past this, events are answered 503.
    pub queue_bound: usize,
    pub notify: NotifyConfig,
    pub limits: Limits,
    pub sources: SourceConfig,
    /// True when the store is the embedded local directory: its object API
    /// then fires events itself, as an S3 server's webhook would.
    pub embedded: bool,
    /// Largest object the object API accepts.
    pub max_object_bytes: usize,
    /// Request bodies (objects and JSON) held in memory at once, in bytes,
    /// from their first byte until the request is done with them: past it
    /// a request is answered 503 instead of adding to it.
    pub body_memory: usize,
    /// How long shutdown waits for queued and running work.
    pub drain_timeout: Duration,
    /// An invocation the store failed in a way that may pass (`backend`
    /// with no answer, a timeout, or a 5xx, 408 or 429; not a refusal)
    /// runs again after each of these waits in turn; its result is
    /// delivered once it succeeds or they are used up.
    pub backend_retries: Vec<Duration>,
    /// Client connections open at once; more wait to be accepted.
    pub max_connections: usize,
    /// How long a client may take to send a request's headers, sit idle
    /// between requests, or send nothing of a body it started (408), before
    /// its connection is closed: a client trickling a byte now and then
    /// would otherwise hold a connection and its buffers for ever.
    pub client_timeout: Duration,
    /// How long caches may keep a `?image` answer without asking again:
    /// zero sends `Cache-Control: no-cache` (a cache asks each time, with
    /// the tag), more `public, max-age=` that many seconds (what proxies
    /// such as nginx and Varnish need to store it at all).
    pub image_max_age: Duration,
}

impl HostConfig {
    /// Defaults for a data directory: one worker per core, a queue of 1024.
    pub fn new(data_dir: PathBuf) -> HostConfig {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        HostConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            notify: NotifyConfig::new(data_dir.join(".imgfunc").join("dead-letter.jsonl")),
            data_dir,
            functions_dir: None,
            workers: cores,
            queue_bound: 1024,
            limits: Limits::default(),
            sources: SourceConfig::default(),
            embedded: true,
            max_object_bytes: 256 * 1024 * 1024,
            body_memory: 1 << 30,
            drain_timeout: Duration::from_secs(60),
            backend_retries: [5, 30, 120].map(Duration::from_secs).to_vec(),
            max_connections: 1024,
            client_timeout: Duration::from_secs(30),
            image_max_age: Duration::ZERO,
        }
    }
}

/// Shared by every handler and worker.
pub struct AppState {
    pub config: HostConfig,
    pub store: Arc<dyn ObjectStore>,
    pub rules: RuleBook,
    pub runtime: Runtime,
    pub notifier: Notifier,
    pub queue: queue::Queue,
    /// Work a request hands off so that it finishes even if its client goes
    /// away (a PUT's write and event, an invocation); shutdown waits for it.
    pub detached: tokio_util::task::TaskTracker,
    /// What is left of [`HostConfig::body_memory`], in [`BODY_UNIT`]s.
    bodies: Arc<tokio::sync::Semaphore>,
    /// Event requests parsed and matched at once, on the blocking pool:
    /// one per image thread, so that a flood of them cannot take every
    /// core from the image work.
    pub(super) matching: Arc<tokio::sync::Semaphore>,
    ready: AtomicBool,
}

/// Runs a request's `work` as a task of its own, tracked for the shutdown,
/// and waits for it: the work finishes even if the client goes away.
pub(super) async fn detach<T: Send + 'static>(
    state: &Arc<AppState>,
    work: impl Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    finish(state.detached.spawn(work)).await
}

/// Waits for a task spawned so that a client's going away cannot cut it short.
pub(super) async fn finish<T>(
    task: tokio::task::JoinHandle<Result<T, ApiError>>,
) -> Result<T, ApiError> {
    task.await.unwrap_or_else(|e| {
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("the request's work stopped: {e}"),
        ))
    })
}

/// A short random id for requests and invocations.
pub fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A bound, not yet running host.
pub struct Host {
    state: Arc<AppState>,
    listener: TcpListener,
    workers: queue::Workers,
}

impl Host {
    /// Binds the listener, opens the journal, loads rules and starts the
    /// workers.
    pub async fn bind(config: HostConfig, store: Arc<dyn ObjectStore>) -> anyhow::Result<Host> {
        let notifier = Notifier::new(config.notify.clone())?;
        let runtime = Runtime::new(
            store.clone(),
            config.limits.clone(),
            WatermarkSources::new(config.sources.clone()),
            config.workers,
        )?;
        // Bound first: a second server started on a busy address stops
        // before it touches the journal.
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        let own = config.data_dir.join(".imgfunc");
        if own.exists() && !own.is_dir() {
            anyhow::bail!(
                "{} is a file; imgfunc keeps its own state in a folder there",
                own.display()
            );
        }
        std::fs::create_dir_all(&own)
            .map_err(|e| anyhow::anyhow!("cannot make the folder {}: {e}", own.display()))?;
        let journal_path = own.join("pending.jsonl");
        let (journal, pending) = journal::Journal::open(&journal_path).map_err(|e| {
            anyhow::anyhow!(
                "cannot open the journal of invocations ({}): {e}",
                journal_path.display()
            )
        })?;
        // Rules are read once the journal's lock is held: a second server
        // on the same folder stops before it clears the rule folder's
        // temporary files, which may be a running server's write.
        // A `watermark_image` URL is judged when its rule is set, as it
        // would be at every event: what it names, without fetching it.
        let marks = WatermarkSources::new(config.sources.clone());
        let bucket_check = store.bucket_check();
        let watermark_check = WatermarkCheck::new(move |url| match marks.classify(url)? {
            Source::Object { bucket, .. } => bucket_check(&bucket).map_err(|e| e.to_string()),
            Source::Remote(_) => Ok(()),
        });
        let rules = RuleBook::open_for(
            &config.data_dir.join(".imgfunc").join("rules"),
            config.functions_dir.as_deref(),
            bucket_check,
            Some(watermark_check),
            config.limits.clone(),
        )?;
        let (queue, receiver) = queue::Queue::new(config.queue_bound, Arc::new(journal));
        let body_units =
            (config.body_memory / BODY_UNIT).clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        let workers_count = config.workers.max(1);
        let state = Arc::new(AppState {
            config,
            store,
            rules,
            runtime,
            notifier,
            queue,
            detached: tokio_util::task::TaskTracker::new(),
            bodies: Arc::new(tokio::sync::Semaphore::new(body_units)),
            matching: Arc::new(tokio::sync::Semaphore::new(workers_count)),
            ready: AtomicBool::new(true),
        });
        let workers = queue::Workers::start(state.clone(), receiver);
        queue::resume(&state, pending);
        Ok(Host {
            state,
            listener,
            workers,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn state(&self) -> Arc<AppState> {
        self.state.clone()
    }

    /// Serves until `shutdown` completes, then stops taking requests and
    /// finishes the queued and running work (and its notifications).
    /// Writes down, at once, what a process stopped now leaves: the done
    /// marks gathered so far, and the starts of jobs that did not stop it
    /// themselves (see [`journal`]). For a stop that skips the shutdown's
    /// own (a second signal).
    pub fn journal_keeper(&self) -> impl Fn() + Send + Sync + 'static {
        let journal = self.state.queue.journal.clone();
        let drain = self.state.config.drain_timeout;
        move || {
            journal.unstart_running(drain);
            journal.flush();
        }
    }

    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        let app = router(state.clone());
        tracing::info!(
            addr = %self.listener.local_addr()?,
            store = %state.store.describe(),
            workers = state.config.workers,
            "serving"
        );
        let drain = state.config.drain_timeout;
        let flag = state.clone();
        let shutdown = async move {
            shutdown.await;
            flag.ready.store(false, Ordering::SeqCst);
            tracing::info!(
                drain_secs = drain.as_secs_f64(),
                "stopping: no new connections; open requests get the drain timeout, then \
                 queued work is finished"
            );
        };
        // Open requests get the drain timeout to finish: a client that stops
        // reading a download or sending an upload does not hold the
        // shutdown for ever. Connections still open when it ends are cut off.
        serve(
            self.listener,
            app,
            shutdown,
            drain,
            state.config.max_connections,
            state.config.client_timeout,
        )
        .await;
        tracing::info!("shutting down: finishing queued work");
        // Requests' own work first: a PUT still sends its event to the queue.
        state.detached.close();
        if tokio::time::timeout(drain, state.detached.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = state.detached.len(),
                "requests' work still running after the drain timeout"
            );
        }
        drop(state);
        self.workers.finish(drain).await;
        Ok(())
    }
}

/// Serves `app` on `listener`, at most `max_connections` at once, until
/// `shutdown` completes; then stops accepting, lets each open connection finish the request it is on (idle
/// ones close at once) for up to `drain`, and cuts off those still open.
/// (axum's own loop stops waiting for them, but they would go on until the
/// process exits, through the rest of the shutdown.)
async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
    max_connections: usize,
    client_timeout: Duration,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    // HTTP/1 only: every S3 and QingStor client speaks it, and hyper-util's
    // auto builder first waits, with no timeout, for the bytes that tell
    // HTTP/1 from HTTP/2, so a client that sent nothing held a connection
    // for ever. The header timeout runs from the connection's start and
    // between kept-alive requests.
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(client_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    // Past the cap, new connections wait in the kernel's backlog until one
    // closes, rather than each taking a file descriptor the store needs.
    let open = Arc::new(tokio::sync::Semaphore::new(max_connections));
    loop {
        let permit = tokio::select! {
            permit = open.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // The pause after a failed accept does not hold up a
                    // shutdown.
                    tokio::select! {
                        () = accept_failed(e) => continue,
                        () = &mut shutdown => break,
                    }
                }
            },
            () = &mut shutdown => break,
        };
        while connections.try_join_next().is_some() {}
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            let _open = permit;
            if let Err(e) = connection.await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        while connections.try_join_next().is_some() {}
        tracing::warn!(
            ?drain,
            open = connections.len(),
            "shutting down: connections still open after the drain timeout are cut off"
        );
        connections.shutdown().await;
    }
}

/// As axum's loop does: a connection reset before it was accepted is
/// skipped; anything else (out of file descriptors) is logged, and the
/// loop waits a second for some to be freed.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!("accept error: {e}");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Largest JSON body (events, a direct invocation, a bucket's rules): they
/// are parsed into a tree in memory, several times their size.
pub const MAX_JSON_BODY: usize = 2 << 20;

/// How much of a body over its limit is read and dropped before the 413 is
/// sent, so that the client, still sending, reads the answer instead of a
/// reset connection. Larger bodies get the 413 at once.
const DRAIN_OVER_LIMIT: usize = 64 << 20;

/// The unit in which bodies are counted against
/// [`HostConfig::body_memory`].
const BODY_UNIT: usize = 64 << 10;

/// 503 `busy` with `Retry-After: 1`: the bodies' memory is taken.
fn bodies_full(state: &AppState) -> ApiError {
    ApiError {
        retry_after: Some(1),
        ..ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!(
                "request bodies being received and made images being sent take the {} MiB \
                 the server holds for them; retry later",
                state.config.body_memory >> 20
            ),
        )
    }
}

/// A made image's bytes as a response body, counted against the bodies'
/// memory ([`HostConfig::body_memory`]) until it has been sent: a slow
/// client reading a large output holds it as long as it reads, and many
/// of them would otherwise hold any number. Sent in 256 KiB pieces of the
/// one buffer. Over the budget, 503 `busy` with `Retry-After: 1`.
pub(super) fn counted_body(state: &AppState, bytes: Vec<u8>) -> Result<axum::body::Body, ApiError> {
    let units = u32::try_from(bytes.len().div_ceil(BODY_UNIT).max(1)).unwrap_or(u32::MAX);
    let held = state
        .bodies
        .clone()
        .try_acquire_many_owned(units)
        .map_err(|_| bodies_full(state))?;
    let bytes = Bytes::from(bytes);
    const PIECE: usize = 256 << 10;
    let pieces: Vec<Bytes> = (0..bytes.len())
        .step_by(PIECE)
        .map(|at| bytes.slice(at..(at + PIECE).min(bytes.len())))
        .collect();
    let stream = futures_util::StreamExt::map(futures_util::stream::iter(pieces), move |piece| {
        // Held until the last piece is taken or the body is dropped.
        let _held = &held;
        Ok::<_, std::convert::Infallible>(piece)
    });
    Ok(axum::body::Body::from_stream(stream))
}

/// Once [`HostConfig::client_timeout`] has passed, a body must have come
/// at this many bytes a second on average, or it is answered 408: a client
/// that trickles a byte every few seconds would otherwise hold its
/// connection for ever.
const MIN_BODY_RATE: u64 = 16 << 10;

/// A JSON request body of at most [`MAX_JSON_BODY`] bytes.
pub struct JsonBody(pub Bytes);

/// An object's body, of at most [`HostConfig::max_object_bytes`], and its
/// share of [`HostConfig::body_memory`], held until the body is dropped
/// with it.
pub struct ObjectBody(pub Bytes, pub BodyShare);

/// A body's share of [`HostConfig::body_memory`].
pub struct BodyShare(#[allow(dead_code)] Option<tokio::sync::OwnedSemaphorePermit>);

impl FromRequest<Arc<AppState>> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        read_body(req, MAX_JSON_BODY, "events, invocations and rules", state)
            .await
            .map(|(bytes, _share)| JsonBody(bytes))
    }
}

impl FromRequest<Arc<AppState>> for ObjectBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        read_body(req, state.config.max_object_bytes, "objects", state)
            .await
            .map(|(bytes, share)| ObjectBody(bytes, share))
    }
}

/// Reads a request body of at most `limit` bytes; over it, a 413 naming
/// the limit (after draining what the client sends, up to a bound). The
/// bytes held count against [`HostConfig::body_memory`] as they come
/// (503 when it is used up), and a body must keep coming at
/// [`MIN_BODY_RATE`] once the client timeout has passed (408).
async fn read_body(
    req: Request,
    limit: usize,
    what: &str,
    state: &AppState,
) -> Result<(Bytes, BodyShare), ApiError> {
    let idle = state.config.client_timeout;
    use axum::body::HttpBody;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is over the limit: {what} may have {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // A client that waits for `100 Continue` before it sends gets the 413
    // at once: the body is not read, so no 100 is sent.
    let waits = req
        .headers()
        .get(axum::http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let over = |margin: usize| declared.is_some_and(|n| n > limit.saturating_add(margin) as u64);
    if over(DRAIN_OVER_LIMIT) || (waits && over(0)) {
        return Err(too_large());
    }
    let busy = || bodies_full(state);
    // So does the 503 when the bodies' memory cannot hold the one
    // announced now.
    let room = state.bodies.available_permits().saturating_mul(BODY_UNIT) as u64;
    if waits && declared.is_some_and(|n| n > room) {
        return Err(busy());
    }
    let mut body = req.into_body();
    // Grown as the bytes come, past the first megabyte: a declared length
    // alone does not get a large allocation.
    let capacity = declared.map_or(0, |n| {
        usize::try_from(n).unwrap_or(limit).min(limit).min(1 << 20)
    });
    let mut bytes = Vec::with_capacity(capacity);
    let mut seen = 0usize;
    let mut share: Option<tokio::sync::OwnedSemaphorePermit> = None;
    let started = std::time::Instant::now();
    // Set when the bodies' memory ran out: the rest is read and dropped
    // (up to the same bound as an oversized body), so that the client,
    // still sending, reads the 503 instead of a reset connection.
    let mut refusal = None;
    let stalled = || {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("no part of the request body came for {idle:?}"),
        )
    };
    while let Some(frame) = tokio::time::timeout(
        idle,
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)),
    )
    .await
    .map_err(|_| stalled())?
    {
        let frame = frame.map_err(|e| {
            ApiError::bad_request("invalid_body", format!("cannot read the request body: {e}"))
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen > limit.saturating_add(DRAIN_OVER_LIMIT) {
            break;
        }
        let elapsed = started.elapsed();
        if elapsed > idle && (seen as u64) < MIN_BODY_RATE.saturating_mul(elapsed.as_secs()) {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body came at {} bytes a second; after {idle:?} it must come \
                     at {MIN_BODY_RATE} at least",
                    seen as u64 / elapsed.as_secs().max(1)
                ),
            ));
        }
        if seen <= limit && refusal.is_none() {
            bytes.extend_from_slice(&data);
            // The bytes held (the buffer's capacity) are counted in units.
            let units = bytes.capacity().div_ceil(BODY_UNIT);
            let held = share.as_ref().map_or(0, |p| p.num_permits());
            if units > held {
                let more = u32::try_from(units - held).unwrap_or(u32::MAX);
                match state.bodies.clone().try_acquire_many_owned(more) {
                    Ok(permit) => match share.as_mut() {
                        Some(held) => held.merge(permit),
                        None => share = Some(permit),
                    },
                    Err(_) => {
                        refusal = Some(busy());
                        bytes = Vec::new();
                        share = None;
                    }
                }
            }
        }
    }
    if seen > limit {
        return Err(too_large());
    }
    if let Some(refusal) = refusal {
        return Err(refusal);
    }
    Ok((Bytes::from(bytes), BodyShare(share)))
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(events::ready))
        .route("/v1/events", post(events::post_events))
        .route("/v1/invoke", post(events::invoke))
        .route(
            "/{bucket}",
            get(objects::get_bucket)
                .put(objects::put_bucket)
                .delete(objects::delete_bucket),
        )
        .route(
            "/{bucket}/{*key}",
            get(objects::get_object)
                .put(objects::put_object)
                .delete(objects::delete_object),
        )
        .fallback(no_route)
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(request_span as fn(&Request) -> tracing::Span)
                .on_failure(response_failed as fn(_, _, &tracing::Span)),
        )
        .with_state(state)
}

/// Each request's log lines carry its method and path (not its query,
/// where a presigned URL keeps its signature).
fn request_span(request: &Request) -> tracing::Span {
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = ?request.uri().path(),
    )
}

/// Answers with a server error are logged by [`ApiError`] itself, at `warn`
/// with their code and request id (a full queue's 503 is a normal answer,
/// not an error of the server); what is left to log here is a response
/// that failed while it was sent.
fn response_failed(
    failure: tower_http::classify::ServerErrorsFailureClass,
    latency: Duration,
    _: &tracing::Span,
) {
    if let tower_http::classify::ServerErrorsFailureClass::Error(error) = failure {
        tracing::warn!(error, ?latency, "the response failed while it was sent");
    }
}

/// Paths no route takes, answered in JSON like every other error: a bucket
/// with an empty key (`/photos/`) or the bare root.
async fn no_route(uri: axum::http::Uri) -> ApiError {
    let path = uri.path();
    let inner = path.strip_prefix('/').and_then(|p| p.strip_suffix('/'));
    match inner {
        Some(bucket) if !bucket.is_empty() && !bucket.contains('/') => {
            ApiError::bad_request("invalid_key", "a key must not be empty")
        }
        _ => ApiError::new(
            StatusCode::NOT_FOUND,
            "no_route",
            format!("no route for {path}: objects are /{{bucket}}/{{key}}"),
        ),
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
