//! The functions a rule can name: `image` (process and save) and `notifier`
//! (just report the event). Each invocation yields the [`InvocationResult`]
//! that is POSTed to the rule's `notify_url`.

mod pool;
mod sources;

pub use pool::CpuPool;
pub use sources::{
    FAILURE_TTL, FetchError, MAX_WATERMARK_BYTES, Source, SourceConfig, WatermarkSources,
    allow_list_entry, s3_url_object,
};

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;

use crate::action::{Action, Op};
use crate::events::Event;
use crate::imaging::{self, Encoded, ImagingError, Limits, WatermarkResolver};
use crate::rules::{CloudFunc, ImageArgs, Rule};
use crate::store::{
    self, Body, Kept, MAX_USER_METADATA_BYTES, ObjectMeta, ObjectStore, PutOptions, StoreError,
};

/// User metadata naming the rules that produced an object, as
/// comma-separated `bucket:rule_id` links. A rule never runs on an object
/// whose chain already holds it, so outputs never re-trigger the rule that
/// made them, even through other rules.
pub const CHAIN_METADATA: &str = "imgfunc-chain";

/// The chain link of rule `rule_id` of `bucket` (bucket names are
/// lowercase letters, digits, `-` and `.`; the id is percent-encoded, so a
/// comma in it cannot split the chain).
pub fn chain_link(bucket: &str, rule_id: &str) -> String {
    format!("{bucket}:{}", crate::rules::id_in_metadata(rule_id))
}

/// The rule chain an object's metadata records (empty when none).
fn chain_of(meta: &ObjectMeta) -> &str {
    meta.user_metadata
        .get(CHAIN_METADATA)
        .map_or("", String::as_str)
}

/// True when `chain` holds rule `rule_id` of `bucket`.
pub fn in_chain(chain: &str, bucket: &str, rule_id: &str) -> bool {
    let link = chain_link(bucket, rule_id);
    chain.split(',').any(|l| l == link)
}

/// Invocations per image thread that may hold a source: reading it,
/// waiting for the thread or being processed. With 2 the image threads
/// were busy 91-98 % of a 500-event backlog, with 4 97-98 %. Writing the
/// output and waiting for its flush hold no slot, so a slow disk does not
/// keep the image threads waiting for sources.
pub const IMAGE_SLOTS_PER_WORKER: usize = 4;

/// What the cloudfuncs need from the host.
pub struct Runtime {
    pub store: Arc<dyn ObjectStore>,
    pub limits: Limits,
    pub sources: WatermarkSources,
    /// Image work runs here, one thread per worker, so that reads and
    /// writes of other invocations overlap it without adding to it.
    pub cpu: CpuPool,
    /// Taken from before a source is read until its image work is done
    /// ([`IMAGE_SLOTS_PER_WORKER`] per image thread): the sources in memory
    /// at once are bounded, the outputs being written are not counted.
    image_slots: Arc<tokio::sync::Semaphore>,
    /// Taken instead of an image slot by an invocation that waits for
    /// watermarks the cache does not have (as many as image slots): the
    /// watermark bytes in memory stay bounded while image work goes on.
    fetch_slots: Arc<tokio::sync::Semaphore>,
}

/// Leave to read a source and have it processed; see [`Runtime::image_slot`].
/// An invocation gives it back once its image work is done.
pub struct ImageSlot {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Runtime {
    /// A runtime with `workers` image threads.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        limits: Limits,
        sources: WatermarkSources,
        workers: usize,
    ) -> std::io::Result<Runtime> {
        let workers = workers.max(1);
        Ok(Runtime {
            store,
            limits,
            sources,
            cpu: CpuPool::new(workers)?,
            image_slots: Arc::new(tokio::sync::Semaphore::new(
                workers * IMAGE_SLOTS_PER_WORKER,
            )),
            fetch_slots: Arc::new(tokio::sync::Semaphore::new(
                workers * IMAGE_SLOTS_PER_WORKER,
            )),
        })
    }

    /// Waits for an image slot; an invocation takes one before it starts.
    pub async fn image_slot(&self) -> ImageSlot {
        // The semaphore is never closed, so this only waits.
        ImageSlot {
            _permit: self.image_slots.clone().acquire_owned().await.ok(),
        }
    }

    /// Writes an object through the store, and drops what the watermark
    /// cache holds for it: a logo written (by a client or an invocation)
    /// is used from the next invocation on. Gives the store's ETag.
    pub async fn put(
        &self,
        bucket: &str,
        key: &str,
        bytes: Bytes,
        opts: PutOptions,
    ) -> Result<Option<String>, StoreError> {
        let etag = self.store.put(bucket, key, bytes, opts).await?;
        self.sources.forget_object(bucket, key);
        Ok(etag)
    }

    /// Deletes an object through the store, and drops what the watermark
    /// cache holds for it.
    pub async fn delete(&self, bucket: &str, key: &str) -> Result<(), StoreError> {
        self.store.delete(bucket, key).await?;
        self.sources.forget_object(bucket, key);
        Ok(())
    }

    /// Runs image work on the CPU pool, holding `slot` until the work is
    /// done: a caller that goes away (a client that hangs up) cannot free
    /// the slot while its work still waits or runs, so queued work stays
    /// bounded by the slots, and work nobody waits for any more is skipped
    /// when its turn comes.
    pub async fn run_cpu<T: Send + 'static>(
        &self,
        slot: ImageSlot,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        self.cpu
            .run(move || {
                let _slot = slot;
                work()
            })
            .await
    }
}

/// The outcome of one invocation, as `notify_url` receives it.
#[derive(Debug, Clone, Serialize)]
pub struct InvocationResult {
    pub invocation_id: String,
    pub rule_id: String,
    pub cloudfunc: &'static str,
    pub event: EventSummary,
    /// `ok`, `error`, or `skipped` (the loop guard).
    pub status: Status,
    pub outputs: Vec<WrittenObject>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub info: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// Time spent running, in milliseconds: reading, image work and
    /// writing, not waits for an image thread.
    pub duration_ms: f64,
    /// Time spent waiting, in milliseconds: in the host's queue before
    /// running, and for an image thread once the source was read.
    pub queue_ms: f64,
    /// The store failed in a way that may pass: the host may run the
    /// invocation again before it reports it.
    #[serde(skip)]
    pub transient: bool,
}

/// The event a result answers: its object, its type, and the object's size
/// and ETag when the event carried them (a delete carries neither).
#[derive(Debug, Clone, Serialize)]
pub struct EventSummary {
    pub bucket: String,
    pub key: String,
    #[serde(rename = "type")]
    pub event_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Error,
    Skipped,
}

/// An object an invocation wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WrittenObject {
    pub bucket: String,
    pub key: String,
    pub content_type: String,
    pub bytes: u64,
    pub width: u32,
    pub height: u32,
    /// The object's rule chain (see [`CHAIN_METADATA`]).
    #[serde(skip)]
    pub chain: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

/// Why an invocation failed.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Imaging(#[from] ImagingError),
    #[error("{event} events carry no object for the image cloudfunc to process")]
    NoObject { event: &'static str },
    #[error("processing stopped unexpectedly: {0}")]
    Internal(String),
    /// A watermark's store or host failed in a way that may pass.
    #[error("watermark_image: cannot read watermark {url}: {message}")]
    WatermarkFetch { url: String, message: String },
}

impl InvokeError {
    /// Whether the store failed in a way that may pass (see
    /// [`StoreError::Backend`]).
    pub fn is_transient(&self) -> bool {
        match self {
            InvokeError::Store(e) => e.is_transient(),
            InvokeError::WatermarkFetch { .. } => true,
            _ => false,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            InvokeError::Store(e) => e.code(),
            InvokeError::Imaging(e) => e.code(),
            InvokeError::NoObject { .. } => "no_object",
            InvokeError::Internal(_) => "internal",
            InvokeError::WatermarkFetch { .. } => "watermark_unavailable",
        }
    }
}

/// Runs `rule`'s cloudfunc for `event`, holding `slot` until its image
/// work is done. `before_image_work` is called once the source has been
/// read, just before its image work is handed to an image thread (not at
/// all when the invocation ends sooner); what it returns is called when the
/// image work has ended, before the outputs are written.
pub async fn invoke<E: FnOnce()>(
    rt: &Runtime,
    invocation_id: &str,
    rule: &Rule,
    event: &Event,
    slot: ImageSlot,
    before_image_work: impl FnOnce() -> E,
) -> InvocationResult {
    let started = Instant::now();
    let mut thread_wait = Duration::ZERO;
    let mut result = InvocationResult {
        invocation_id: invocation_id.to_string(),
        rule_id: rule.id.clone(),
        cloudfunc: rule.cloudfunc.name(),
        event: EventSummary {
            bucket: event.bucket.clone(),
            key: event.key.clone(),
            event_type: event.event_type.as_str(),
            size: event.size,
            etag: event.etag.clone(),
        },
        status: Status::Ok,
        outputs: Vec::new(),
        info: None,
        error: None,
        duration_ms: 0.0,
        queue_ms: 0.0,
        transient: false,
    };
    match &rule.cloudfunc {
        CloudFunc::Notifier => drop(slot),
        // Outputs written before a later write failed stay in the result:
        // they are in the store, and their events fire.
        CloudFunc::Image(args) => {
            use futures_util::FutureExt;
            let mut done = Done {
                outputs: &mut result.outputs,
                thread_wait: &mut thread_wait,
            };
            let run = run_image(rt, rule, args, event, slot, &mut done, before_image_work);
            // A panic on the way (the store's client, say) fails this
            // invocation with a result like any other, not the host.
            let ran = std::panic::AssertUnwindSafe(run)
                .catch_unwind()
                .await
                .unwrap_or_else(|panic| {
                    Err(InvokeError::Internal(panic_message(panic.as_ref()).into()))
                });
            match ran {
                Ok(ImageOutcome::Done { info }) => result.info = info,
                Ok(ImageOutcome::Skipped(reason)) => {
                    result.status = Status::Skipped;
                    result.error = Some(ErrorBody {
                        code: "loop_guard".into(),
                        message: reason,
                    });
                }
                Err(e) => {
                    result.status = Status::Error;
                    result.transient = e.is_transient();
                    result.error = Some(ErrorBody {
                        code: e.code().into(),
                        message: e.to_string(),
                    });
                }
            }
        }
    }
    let ran = started.elapsed().saturating_sub(thread_wait);
    result.duration_ms = (ran.as_secs_f64() * 1e5).round() / 100.0;
    // The host's queue adds its own wait to this.
    result.queue_ms = (thread_wait.as_secs_f64() * 1e5).round() / 100.0;
    result
}

/// What a panic said, when it said it with a string.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

enum ImageOutcome {
    Done { info: Option<Value> },
    Skipped(String),
}

/// What an image invocation leaves in its result however it ends: the
/// outputs it wrote, and how long it waited for an image thread.
struct Done<'a> {
    outputs: &'a mut Vec<WrittenObject>,
    thread_wait: &'a mut Duration,
}

async fn run_image<E: FnOnce()>(
    rt: &Runtime,
    rule: &Rule,
    args: &ImageArgs,
    event: &Event,
    slot: ImageSlot,
    done: &mut Done<'_>,
    before_image_work: impl FnOnce() -> E,
) -> Result<ImageOutcome, InvokeError> {
    use crate::rules::EventType;
    if matches!(
        event.event_type,
        EventType::DeleteObject | EventType::AbortMultipart
    ) {
        return Err(InvokeError::NoObject {
            event: event.event_type.as_str(),
        });
    }
    // The store is told an output is coming, so that its flush of the
    // outputs written together does not wait for more once none is left.
    let intent = rt.store.expect_write();
    // Watermarks the cache does not have are fetched holding a fetch slot
    // instead of the image slot: an invocation waiting for a slow or
    // unreachable watermark host keeps only itself (and others that need
    // a fetch) waiting, not the image threads. The source is checked first,
    // so that a skipped, missing or oversized one fetches nothing.
    let (watermarks, slot) = match cached_watermarks(rt, args) {
        Some(watermarks) => (watermarks, slot),
        None => {
            let meta = rt.store.head(&event.bucket, &event.key).await?;
            if let Some(skipped) = screen(&meta, event, rule, &rt.limits)? {
                return Ok(skipped);
            }
            drop(slot);
            let fetch_slot = rt.fetch_slots.clone().acquire_owned().await.ok();
            let watermarks = fetch_watermarks(rt, args).await;
            let slot = rt.image_slot().await;
            drop(fetch_slot);
            (watermarks, slot)
        }
    };
    // An object this rule wrote is left unread.
    let action = args.action.clone();
    let limits = rt.limits.clone();
    let (bucket, rule_id) = (event.bucket.clone(), rule.id.clone());
    let (meta, input) = read_source(rt, &event.bucket, &event.key, &action, move |meta| {
        in_chain(chain_of(meta), &bucket, &rule_id)
    })
    .await?;
    if let Some(skipped) = screen(&meta, event, rule, &limits)? {
        return Ok(skipped);
    }
    let chain = chain_of(&meta).to_string();
    let Some(input) = input else {
        return Err(ImagingError::input_too_large(meta.size, &limits).into());
    };
    // Once the source is known to be one to process: a skip or a lasting
    // failure of its own is reported as such.
    if let Some(failure) = watermarks.passing_failure() {
        return Err(failure);
    }
    let (size, name) = (meta.size, format!("{}/{}", event.bucket, event.key));
    let image_work_ended = before_image_work();
    let handed = Instant::now();
    let output = rt
        .run_cpu(slot, move || {
            let waited = handed.elapsed();
            let work = || -> Result<_, InvokeError> {
                let input = read_kept(input, size, &action, &limits, &name)?;
                Ok(imaging::process(&input, &action, &limits, &watermarks)?)
            };
            (waited, work())
        })
        .await;
    // Called when the image work ends, not when this future is dropped
    // (a shutdown that stops it leaves the image thread at work).
    image_work_ended();
    let (waited, output) = output.map_err(InvokeError::Internal)?;
    *done.thread_wait = waited;
    let output = output?;

    let link = chain_link(&event.bucket, &rule.id);
    let chain = if chain.is_empty() {
        link
    } else {
        format!("{chain},{link}")
    };
    // The original is never replaced: a `save` naming it is refused before
    // anything is written (the output key is held apart when the rule is set).
    if let Some(save) = output
        .saves
        .iter()
        .find(|s| s.bucket == event.bucket && s.key == event.key)
    {
        return Err(ImagingError::Operation {
            op: "save",
            message: format!(
                "b_{},k_{} is the source object itself; an invocation never overwrites \
                 its source",
                crate::shown(&save.bucket),
                crate::shown(&save.key)
            ),
        }
        .into());
    }
    // Nor is an object imgfunc did not write: where an output's key is the
    // original's own (no prefix, no separator: only the bucket differs) or
    // a `save` names a key, the target is looked at first, and one with no
    // chain (an upload) is left alone. Two rules saving into each other's
    // buckets would otherwise replace an original before the loop guard
    // stops them.
    let mut targets: Vec<(&str, &str)> = output
        .saves
        .iter()
        .map(|s| (s.bucket.as_str(), s.key.as_str()))
        .collect();
    let main_key = args.output_key(&event.key);
    if output.image.is_some() && main_key == event.key {
        targets.push((args.output_bucket(&event.bucket), &event.key));
    }
    for (bucket, key) in targets {
        match rt.store.head(bucket, key).await {
            Ok(meta) if chain_of(&meta).is_empty() => {
                return Err(ImagingError::Operation {
                    op: "save",
                    message: format!(
                        "{}/{} is an object imgfunc did not write; an invocation never \
                         replaces one",
                        crate::shown(bucket),
                        crate::shown(key)
                    ),
                }
                .into());
            }
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    let source = format!("{}/{}", event.bucket, event.key);
    if output.image.is_some() || !output.saves.is_empty() {
        intent.writing();
    }
    if let Some(image) = &output.image {
        let bucket = args.output_bucket(&event.bucket);
        done.outputs
            .push(write(rt, bucket, &main_key, image, &chain, &source).await?);
    }
    for save in &output.saves {
        done.outputs
            .push(write(rt, &save.bucket, &save.key, &save.image, &chain, &source).await?);
    }
    Ok(ImageOutcome::Done { info: output.info })
}

/// Opens the source `bucket/key` for `action` off the async runtime, and
/// reads it there too unless its bytes are all in memory: only its DC scans
/// when that is all a thumbnail uses. So the image threads never wait for a
/// disk or the network, and a source in memory is copied by the image
/// thread that decodes it, just before it does ([`read_kept`]), which
/// finds the bytes in its own cache and spares a hand-off between threads.
/// `None` when `skip` says so from the object's metadata, or when the
/// object is over the input size limit (left unread either way).
pub async fn read_source(
    rt: &Runtime,
    bucket: &str,
    key: &str,
    action: &Action,
    skip: impl Fn(&ObjectMeta) -> bool + Send + 'static,
) -> Result<(ObjectMeta, Option<Kept>), StoreError> {
    let (action, limits) = (action.clone(), rt.limits.clone());
    rt.store
        .open_with(
            bucket,
            key,
            Box::new(move |meta, body| {
                if skip(meta) || meta.size > limits.max_input_bytes as u64 {
                    return Ok(None);
                }
                let mut reader = match body {
                    Body::Bytes(bytes) => return Ok(Some(Kept::Bytes(bytes))),
                    Body::File(file) if store::resident(&file, meta.size) => {
                        // The store opens its own files without access
                        // times; another user's file gets one on its first
                        // read since it was written (relatime), which can
                        // wait for the filesystem's journal. So the first
                        // read is made here, and the image thread's make
                        // no update (a byte more for the store's files).
                        use std::os::unix::fs::FileExt;
                        file.read_at(&mut [0u8; 1], 0)?;
                        return Ok(Some(Kept::File(file)));
                    }
                    body => body.into_reader(),
                };
                Ok(read_input(&mut reader, meta.size, &action, &limits)?.map(Kept::Bytes))
            }),
        )
        .await
}

/// The source's bytes from what [`read_source`] kept, reading the file it
/// kept (whose bytes are in memory) where this is called. A file that
/// turns out longer than announced, past the input limit, is an
/// [`ImagingError::InputTooLarge`]. `name` names the object in errors.
pub fn read_kept(
    kept: Kept,
    size: u64,
    action: &Action,
    limits: &Limits,
    name: &str,
) -> Result<Bytes, InvokeError> {
    match kept {
        Kept::Bytes(bytes) => Ok(bytes),
        Kept::File(mut file) => read_input(&mut file, size, action, limits)
            .map_err(|e| StoreError::io("read", name, e))?
            .ok_or_else(|| ImagingError::input_too_large(size, limits).into()),
    }
}

/// Reads what `action` needs of a source of `size` bytes from `reader`;
/// `None` when it holds more than announced, past the input limit.
fn read_input(
    reader: &mut dyn std::io::Read,
    size: u64,
    action: &Action,
    limits: &Limits,
) -> std::io::Result<Option<Bytes>> {
    // The reader parses untrusted bytes: a panic there fails this read,
    // not the worker that runs it.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        match imaging::read_source(reader, size, action, limits) {
            Ok(read) => Ok(Some(read.into())),
            // More than announced, past the limit: left unread, as an
            // object over it is.
            Err(e) if e.kind() == std::io::ErrorKind::FileTooLarge => Ok(None),
            Err(e) => Err(e),
        }
    }))
    .unwrap_or_else(|_| {
        Err(std::io::Error::other(
            "reading the source stopped unexpectedly (a panic in the reader)",
        ))
    })
}

async fn write(
    rt: &Runtime,
    bucket: &str,
    key: &str,
    image: &Encoded,
    chain: &str,
    source: &str,
) -> Result<WrittenObject, InvokeError> {
    let content_type = image.format.content_type();
    // The source name is informative and takes what room the chain, which
    // the loop guard needs, leaves in the metadata's limit.
    let room = MAX_USER_METADATA_BYTES
        .saturating_sub(CHAIN_METADATA.len() + chain.len() + SOURCE_METADATA.len());
    let mut meta = BTreeMap::new();
    meta.insert(CHAIN_METADATA.to_string(), chain.to_string());
    meta.insert(
        SOURCE_METADATA.to_string(),
        source_meta(source, room.min(MAX_SOURCE_META)),
    );
    let opts = PutOptions {
        content_type: content_type.to_string(),
        user_metadata: meta,
    };
    rt.put(bucket, key, Bytes::from(image.bytes.clone()), opts)
        .await?;
    Ok(WrittenObject {
        bucket: bucket.to_string(),
        key: key.to_string(),
        content_type: content_type.to_string(),
        bytes: image.bytes.len() as u64,
        width: image.width,
        height: image.height,
        chain: chain.to_string(),
    })
}

/// Bytes of a source name percent-encoded in its metadata value: values
/// are printable ASCII without a leading or trailing space; keys may hold
/// anything but NUL.
const SOURCE_IN_META: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b' ').add(b'%');

/// User metadata naming the object an output was made from (`bucket/key`).
const SOURCE_METADATA: &str = "imgfunc-source";

/// The longest source name kept in the metadata; a longer one is cut (and
/// ends in `...`), so that the object's metadata stays within its limit.
const MAX_SOURCE_META: usize = 512;

/// The `imgfunc-source` metadata value for `source` (`bucket/key`), at most
/// `max` bytes (empty when not even `...` fits).
fn source_meta(source: &str, max: usize) -> String {
    let mut value = percent_encoding::utf8_percent_encode(source, SOURCE_IN_META).to_string();
    if value.len() > max {
        if max < 3 {
            return String::new();
        }
        // The value is ASCII, so any byte is a boundary; a cut escape
        // (`%` or `%X` at the end) goes too.
        value.truncate(max - 3);
        if let Some(i) = value[value.len().saturating_sub(2)..].find('%') {
            value.truncate(value.len().saturating_sub(2) + i);
        }
        value.push_str("...");
    }
    value
}

/// Watermark bytes fetched before the CPU work starts, keyed by URL; a
/// failed fetch is kept as its message so imaging reports it in context.
#[derive(Default)]
struct Prefetched(HashMap<String, Result<Arc<[u8]>, FetchError>>);

impl Prefetched {
    /// The first watermark whose fetch failed in a way that may pass, as
    /// the invocation's error: it runs again later instead of reporting a
    /// store's or host's passing failure as final.
    fn passing_failure(&self) -> Option<InvokeError> {
        self.0.iter().find_map(|(url, fetched)| match fetched {
            Err(e) if e.transient => Some(InvokeError::WatermarkFetch {
                url: url.clone(),
                message: e.message.clone(),
            }),
            _ => None,
        })
    }
}

impl WatermarkResolver for Prefetched {
    fn resolve(&self, url: &str) -> Result<Vec<u8>, String> {
        match self.0.get(url) {
            Some(Ok(bytes)) => Ok(bytes.to_vec()),
            Some(Err(e)) => Err(e.message.clone()),
            None => Err(format!("{url} was not fetched")),
        }
    }
}

/// What becomes of a source from its metadata alone: skipped when `rule`
/// itself wrote it, an error when it is over the input limit, else `None`
/// (it is read and processed).
fn screen(
    meta: &ObjectMeta,
    event: &Event,
    rule: &Rule,
    limits: &Limits,
) -> Result<Option<ImageOutcome>, InvokeError> {
    if in_chain(chain_of(meta), &event.bucket, &rule.id) {
        return Ok(Some(ImageOutcome::Skipped(format!(
            "{}/{} was written by rule {}; it does not run on its own output",
            event.bucket, event.key, rule.id
        ))));
    }
    if meta.size > limits.max_input_bytes as u64 {
        return Err(ImagingError::input_too_large(meta.size, limits).into());
    }
    Ok(None)
}

/// The action's watermarks when the cache has every one (none needed
/// counts), or `None` when some must be fetched.
fn cached_watermarks(rt: &Runtime, args: &ImageArgs) -> Option<Prefetched> {
    let mut map = HashMap::new();
    for op in &args.action.ops {
        if let Op::WatermarkImage(w) = op {
            map.insert(w.url.clone(), rt.sources.cached(&w.url)?);
        }
    }
    Some(Prefetched(map))
}

async fn fetch_watermarks(rt: &Runtime, args: &ImageArgs) -> Prefetched {
    let mut map = HashMap::new();
    for op in &args.action.ops {
        if let Op::WatermarkImage(w) = op
            && !map.contains_key(&w.url)
        {
            let got = rt.sources.fetch(rt.store.as_ref(), &w.url).await;
            map.insert(w.url.clone(), got);
        }
    }
    Prefetched(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_links_are_printable_and_unambiguous() {
        assert_eq!(chain_link("photos", "thumbs-2_x.y"), "photos:thumbs-2_x.y");
        let link = chain_link("photos", "缩略图,a:b");
        assert_eq!(link, "photos:%E7%BC%A9%E7%95%A5%E5%9B%BE%2Ca%3Ab");
        let chain = format!("{},{link}", chain_link("other", "a"));
        assert!(in_chain(&chain, "photos", "缩略图,a:b"));
        assert!(in_chain(&chain, "other", "a"));
        assert!(!in_chain(&chain, "photos", "缩略图"));
        assert!(!in_chain(&chain, "photos", "a"));
    }

    #[tokio::test]
    async fn a_slot_is_held_until_its_image_work_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::store::LocalStore::new(dir.path().to_path_buf()));
        let rt = Arc::new(
            Runtime::new(
                store,
                Limits::default(),
                WatermarkSources::new(SourceConfig::default()),
                1,
            )
            .unwrap(),
        );
        let free = || rt.image_slots.available_permits();
        let slot = rt.image_slot().await;
        assert_eq!(free(), IMAGE_SLOTS_PER_WORKER - 1);
        let (release, held) = std::sync::mpsc::channel::<()>();
        let request = tokio::spawn({
            let rt = rt.clone();
            async move { rt.run_cpu(slot, move || held.recv().is_ok()).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // The client hangs up while its image is processed: the slot stays
        // taken until the work is done, so new requests cannot pile up work.
        request.abort();
        let _ = request.await;
        assert_eq!(free(), IMAGE_SLOTS_PER_WORKER - 1);
        release.send(()).unwrap();
        for _ in 0..200 {
            if free() == IMAGE_SLOTS_PER_WORKER {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(free(), IMAGE_SLOTS_PER_WORKER);
    }

    #[tokio::test]
    async fn a_source_in_memory_is_left_for_the_image_thread_to_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::store::LocalStore::new(dir.path().to_path_buf()));
        let rt = Runtime::new(
            store.clone(),
            Limits::default(),
            WatermarkSources::new(SourceConfig::default()),
            1,
        )
        .unwrap();
        let limits = Limits::default();
        // A baseline photo is read whole; of a progressive one a thumbnail
        // reads only the DC scans.
        for name in ["wood.jpg", "wood-progressive-1280.jpg"] {
            let photo = std::fs::read(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("fixtures/images")
                    .join(name),
            )
            .unwrap();
            let size = photo.len() as u64;
            store
                .put("b", name, Bytes::from(photo.clone()), PutOptions::default())
                .await
                .unwrap();
            let action = Action::parse("resize:w_50").unwrap();
            let wanted = read_input(&mut photo.as_slice(), size, &action, &limits)
                .unwrap()
                .unwrap();
            let read = |kept: Kept| read_kept(kept, size, &action, &limits, name).unwrap();
            let path = dir.path().join("b").join(name);

            // Skipped: nothing is kept.
            let (_, kept) = read_source(&rt, "b", name, &action, |_| true)
                .await
                .unwrap();
            assert!(kept.is_none());

            // Just written, so in memory: the file itself is kept (where
            // the kernel can be asked: `resident` has its own test).
            let (meta, kept) = read_source(&rt, "b", name, &action, |_| false)
                .await
                .unwrap();
            assert_eq!(meta.size, size);
            let kept = kept.unwrap();
            if !store::resident(&std::fs::File::open(&path).unwrap(), size) {
                eprintln!("the page cache is not asked here; sources are read at once");
                assert!(matches!(kept, Kept::Bytes(_)));
                continue;
            }
            assert!(matches!(kept, Kept::File(_)), "{name}");
            assert_eq!(read(kept), wanted, "{name}");

            // A kept file is the version that was opened, even if the object
            // is replaced before the image thread reads it.
            let (_, kept) = read_source(&rt, "b", name, &action, |_| false)
                .await
                .unwrap();
            store
                .put(
                    "b",
                    name,
                    Bytes::from_static(b"replaced"),
                    PutOptions::default(),
                )
                .await
                .unwrap();
            let kept = kept.unwrap();
            assert!(matches!(kept, Kept::File(_)), "{name}");
            assert_eq!(read(kept), wanted, "{name}");
            store
                .put("b", name, Bytes::from(photo.clone()), PutOptions::default())
                .await
                .unwrap();

            // Out of memory: read at once, off the image threads.
            store::evict(&path);
            if store::resident(&std::fs::File::open(&path).unwrap(), size) {
                eprintln!("pages cannot be dropped here (tmpfs); the rest is skipped");
                continue;
            }
            let (_, kept) = read_source(&rt, "b", name, &action, |_| false)
                .await
                .unwrap();
            let kept = kept.unwrap();
            assert!(matches!(kept, Kept::Bytes(_)), "{name}");
            assert_eq!(read(kept), wanted, "{name}");
        }
    }

    #[test]
    fn source_metadata_is_printable_and_bounded() {
        assert_eq!(source_meta("photos/a b.jpg ", 512), "photos/a%20b.jpg%20");
        assert_eq!(source_meta("photos/100%.jpg", 512), "photos/100%25.jpg");
        assert_eq!(source_meta("photos/a.jpg", 10), "photos/...");
        assert_eq!(source_meta("photos/a.jpg", 2), "");
        // 300 three-byte characters encode to 2700 bytes: cut at 512,
        // never inside an escape.
        let value = source_meta(&format!("photos/{}", "图".repeat(300)), MAX_SOURCE_META);
        assert!(value.len() <= MAX_SOURCE_META, "{}", value.len());
        assert!(value.ends_with("..."));
        let body = value.trim_end_matches("...");
        assert!(body.bytes().all(|b| (0x21..0x7f).contains(&b)));
        let escapes = body.match_indices('%').count();
        assert_eq!(body.len(), "photos/".len() + 3 * escapes);
    }
}
