//! Object storage: the [`ObjectStore`] interface and its two implementations.
//!
//! [`LocalStore`] keeps buckets as folders on disk and is the embedded
//! default; [`S3Store`] talks to any S3-compatible endpoint (QingStor, MinIO,
//! AWS) through `aws-sdk-s3`. Both follow S3's semantics where they can, so
//! the code above this module (the `image` cloudfunc, the host) sees one
//! behaviour:
//!
//! - a missing object is [`StoreError::NotFound`], a missing bucket
//!   [`StoreError::NoSuchBucket`]; [`StoreError::is_not_found`] covers both;
//! - deleting a missing object succeeds;
//! - listing is recursive (no delimiter), sorted by key, and capped at
//!   [`LIST_LIMIT`] entries;
//! - user metadata names are case-insensitive and come back lowercase, as
//!   S3 returns them.

mod attribute;
mod error;
mod flush;
mod local;
mod s3;
mod validate;

pub use error::StoreError;
#[cfg(test)]
pub(crate) use local::evict;
pub use local::{LocalStore, MetadataPlace, resident, set_page_cache_check};
pub use s3::{S3_READ_TIMEOUT, S3Store};
pub use validate::{MAX_USER_METADATA_BYTES, validate_bucket, validate_key, validate_local_key};

use bytes::Bytes;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

/// The content type used when a put names none and a stored object has none.
pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// The most entries [`ObjectStore::list`] returns; further keys are left out
/// (with a warning in the log) so one huge bucket cannot exhaust memory.
pub const LIST_LIMIT: usize = 10_000;

/// A boxed, sendable future, so that [`ObjectStore`] stays object-safe and
/// usable as `Arc<dyn ObjectStore>` without the `async-trait` crate.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What is known about a stored object besides its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The object's `Content-Type`; [`DEFAULT_CONTENT_TYPE`] when none was stored.
    pub content_type: String,
    /// The object's size in bytes.
    pub size: u64,
    /// User metadata (S3's `x-amz-meta-*`), names in lowercase.
    pub user_metadata: BTreeMap<String, String>,
    /// When the object was last written, when the store knows it.
    pub last_modified: Option<SystemTime>,
    /// The object's entity tag as HTTP gives it (quoted), when the store
    /// makes one: S3's own; the local store's from the file's inode, size
    /// and modification time (each write makes a new file).
    pub etag: Option<String>,
}

/// An object read whole: its bytes and its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub bytes: Bytes,
    pub meta: ObjectMeta,
}

/// An object opened for reading: its metadata, then its bytes.
pub struct ObjectReader {
    pub meta: ObjectMeta,
    pub body: Body,
}

/// The bytes of an opened object: already in memory, or read on demand (so
/// that a reader which needs only part of a large object reads only that).
pub enum Body {
    Bytes(Bytes),
    /// Blocking reads, from a disk or the network: read it on tokio's
    /// blocking pool or a thread of its own, never on a runtime worker (the
    /// S3 store's reader waits on the runtime for each chunk).
    Read(Box<dyn std::io::Read + Send>),
    /// An open file of the local store: reads may wait for a disk, unless
    /// [`resident`] says its bytes are all in memory.
    File(std::fs::File),
}

impl Body {
    /// The body as a blocking reader (see [`Body::Read`]). Bytes already in
    /// memory are read in place; a caller that wants them as they are
    /// matches [`Body::Bytes`] first.
    pub fn into_reader(self) -> Box<dyn std::io::Read + Send> {
        match self {
            Body::Bytes(bytes) => Box::new(bytes::Buf::reader(bytes)),
            Body::Read(reader) => reader,
            Body::File(file) => Box::new(file),
        }
    }
}

/// What an [`ObjectStore::open_with`] reader keeps of an object.
pub enum Kept {
    /// The bytes it read.
    Bytes(Bytes),
    /// The local store's open file, for the caller to read where it
    /// chooses (`cloudfunc::read_source` keeps one only when [`resident`]
    /// found every byte in memory, for an image thread to read).
    File(std::fs::File),
}

/// Runs blocking I/O on tokio's blocking pool. A panic there goes on in the
/// caller; a task the runtime dropped (at shutdown) is an I/O error of `op`
/// on `what`.
async fn run_blocking<T, F>(
    op: &'static str,
    what: impl Into<std::path::PathBuf>,
    f: F,
) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(err) => Err(StoreError::io(op, what, std::io::Error::other(err))),
    }
}

/// What [`ObjectStore::open_with`] does with an opened object: given its
/// metadata and body, what to keep, or `None` to leave the body unread.
pub type ReadBody =
    Box<dyn FnOnce(&ObjectMeta, Body) -> std::io::Result<Option<Kept>> + Send + 'static>;

/// Up to [`LIST_LIMIT`] keys of a listing, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListPage {
    pub entries: Vec<ListEntry>,
    /// More keys follow the last one: list again from it.
    pub truncated: bool,
}

/// One object in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListEntry {
    pub key: String,
    pub size: u64,
    pub last_modified: Option<SystemTime>,
}

/// How to store an object.
///
/// Metadata names are ASCII letters, digits, `-`, `_` or `.`, stored in
/// lowercase; values and the content type are printable ASCII; names and
/// values together are at most 2 KiB, as on S3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutOptions {
    /// The object's `Content-Type`; empty means [`DEFAULT_CONTENT_TYPE`].
    pub content_type: String,
    /// User metadata, sent as `x-amz-meta-<name>` on S3.
    pub user_metadata: BTreeMap<String, String>,
}

impl PutOptions {
    /// Options with this content type and no user metadata.
    pub fn with_content_type(content_type: impl Into<String>) -> Self {
        PutOptions {
            content_type: content_type.into(),
            user_metadata: BTreeMap::new(),
        }
    }
}

impl Default for PutOptions {
    fn default() -> Self {
        PutOptions::with_content_type(DEFAULT_CONTENT_TYPE)
    }
}

/// A write announced before its bytes exist; see [`ObjectStore::expect_write`].
#[derive(Debug, Default)]
pub struct WriteIntent(Option<flush::Expected>);

impl WriteIntent {
    /// The announced write starts now.
    pub fn writing(self) {
        if let Some(expected) = self.0 {
            expected.writing();
        }
    }
}

/// A place objects are read from and written to, addressed by bucket and key.
///
/// The returned futures own copies of their arguments and borrow only the
/// store, so callers may pass temporaries.
pub trait ObjectStore: Send + Sync + 'static {
    /// Reads a whole object.
    fn get(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<Object, StoreError>>;

    /// Opens an object for reading. Stores that cannot read incrementally
    /// return the whole object, as [`ObjectStore::get`] does.
    fn open(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<ObjectReader, StoreError>> {
        let get = self.get(bucket, key);
        Box::pin(async move {
            let object = get.await?;
            Ok(ObjectReader {
                meta: object.meta,
                body: Body::Bytes(object.bytes),
            })
        })
    }

    /// Opens an object and hands its metadata and body to `read`, which
    /// returns what it keeps (the bytes it wants, all or part, or the open
    /// file; `None` to leave them unread). `read` runs on tokio's blocking
    /// pool when the body is [`Body::Read`] or [`Body::File`], and in place
    /// when it is already in memory. The local
    /// store opens and reads in one blocking task, one hand-off between
    /// threads instead of two. An error from `read` comes back as an I/O
    /// error naming the object.
    fn open_with(
        &self,
        bucket: &str,
        key: &str,
        read: ReadBody,
    ) -> BoxFuture<'_, Result<(ObjectMeta, Option<Kept>), StoreError>> {
        let open = self.open(bucket, key);
        let name = format!("{bucket}/{key}");
        Box::pin(async move {
            let ObjectReader { meta, body } = open.await?;
            let streamed = !matches!(body, Body::Bytes(_));
            let task_name = name.clone();
            let run = move || {
                let bytes = read(&meta, body).map_err(|e| read_error(name, e))?;
                Ok((meta, bytes))
            };
            if !streamed {
                return run();
            }
            run_blocking("read", task_name, run).await
        })
    }

    /// Reads an object's metadata without its bytes.
    fn head(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<ObjectMeta, StoreError>>;

    /// Writes an object, replacing any object with the same key. Gives the
    /// new object's ETag, as a read of it would, when the store has one.
    fn put(
        &self,
        bucket: &str,
        key: &str,
        bytes: Bytes,
        opts: PutOptions,
    ) -> BoxFuture<'_, Result<Option<String>, StoreError>>;

    /// Announces a write on its way: an invocation takes this while its
    /// image is made, and calls [`WriteIntent::writing`] just before it puts
    /// the output (or drops it when it will not write). The local store
    /// then flushes a batch of new files at once when no write is left to
    /// come, instead of waiting out its window for more; other stores have
    /// no use for it.
    fn expect_write(&self) -> WriteIntent {
        WriteIntent::default()
    }

    /// Deletes an object; deleting a missing object is not an error.
    fn delete(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Lists the objects whose key starts with `prefix` (all keys when it is
    /// empty), recursively, sorted by key, at most [`LIST_LIMIT`] of them.
    fn list(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> BoxFuture<'_, Result<Vec<ListEntry>, StoreError>> {
        let page = self.list_page(bucket, prefix, "");
        Box::pin(async move { page.await.map(|page| page.entries) })
    }

    /// [`ObjectStore::list`] from the first key after `start_after` (from
    /// the first key when it is empty), saying whether more keys follow the
    /// [`LIST_LIMIT`] it returns.
    fn list_page(
        &self,
        bucket: &str,
        prefix: &str,
        start_after: &str,
    ) -> BoxFuture<'_, Result<ListPage, StoreError>>;

    /// Where this store keeps its objects, for logs and `--help`-style
    /// output: `local:/var/lib/imgfunc` or `s3:http://127.0.0.1:9000`.
    fn describe(&self) -> String;

    /// The check of a bucket name this store takes: [`validate_bucket`],
    /// and S3's own rules on S3. Rules are held to it when they are set, so
    /// that a save to a bucket the store refuses is not found wrong at each
    /// event.
    fn bucket_check(&self) -> BucketCheck {
        validate_bucket
    }
}

/// A remote store's body that failed while it was read: reported as the
/// store's failure (`backend`), not as a local file's.
#[derive(Debug)]
pub(crate) struct BackendRead(pub String);

impl std::fmt::Display for BackendRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BackendRead {}

/// An error from reading an object named `name`: the remote store's own
/// ([`BackendRead`]) or the local file's.
fn read_error(name: String, e: std::io::Error) -> StoreError {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<BackendRead>())
    {
        Some(remote) => StoreError::Backend {
            op: "get_object",
            target: name,
            message: remote.0.clone(),
            transient: true,
        },
        None => StoreError::io("read", name, e),
    }
}

/// See [`ObjectStore::bucket_check`].
pub type BucketCheck = fn(&str) -> Result<(), StoreError>;

/// The content type a key's extension suggests, for an object stored
/// without one (a file put in the store's folder by hand, an upload that
/// sent none); [`DEFAULT_CONTENT_TYPE`] for others.
pub fn guess_content_type(key: &str) -> &'static str {
    let ext = key
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "tif" | "tiff" => "image/tiff",
        "bmp" => "image/bmp",
        "avif" => "image/avif",
        "json" => "application/json",
        "txt" => "text/plain",
        _ => DEFAULT_CONTENT_TYPE,
    }
}
