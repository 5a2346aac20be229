//! The local directory store: buckets are folders, keys are file paths.
//!
//! Layout under the root:
//!
//! ```text
//! <root>/<bucket>/<key>                 the object's bytes, as is
//!     xattr user.imgfunc                its metadata, compactly encoded ([`attribute`])
//! <root>/.imgfunc-meta/<bucket>/<key>   or a sidecar file: {"type": ..., "meta": {...}}
//! ```
//!
//! Metadata (content type and user metadata) lives in an extended attribute
//! of the object's file, set on the temporary file before it is renamed into
//! place: bytes and metadata appear together, and each write creates one
//! file. Where the filesystem refuses user extended attributes, or the
//! metadata does not fit in one, or the store was made with
//! [`MetadataPlace::Sidecar`], it goes to a sidecar file instead, written
//! after the object. Reads take the attribute when the file has one and the
//! sidecar otherwise; a write that stores the attribute removes an older
//! sidecar of the key.
//!
//! The sidecar tree mirrors the object tree file for file (no extension is
//! added), so a key can never collide with another key's sidecar, and bucket
//! names may not start with '.', so `.imgfunc-meta` is never a bucket.
//! Sidecars written by earlier versions (`content_type`, `user_metadata`)
//! are still read. An object with neither (a file copied in by hand) gets a
//! content type guessed from its extension and no user metadata.
//!
//! A bucket exists when its folder does: the first put creates it, and
//! [`LocalStore::create_bucket`] can create an empty one. `get`, `head`,
//! `delete` and `list` on a missing bucket folder return
//! [`StoreError::NoSuchBucket`], as S3 does.
//!
//! Writes go to a new file in the object's folder, unnamed where the
//! filesystem allows (else a temporary name, `.imgfunc-tmp-*`, hidden from
//! listings), are flushed to disk (writes that come together share one
//! flush: [`super::flush`]) and are then linked or renamed into place, so
//! readers never see half an object; the new names are flushed after that
//! (one more flush for the batch), and a folder after a delete, so that
//! what a caller is told is done survives a crash.
//! Within one process, a put and a get of
//! the same key are also ordered, so bytes and a sidecar are read as one
//! version. All file I/O runs on tokio's blocking pool.
//!
//! Because keys are paths, the local store is stricter than S3: keys with
//! `.` or `..` segments, empty segments (`a//b`, `a/`), a leading `/`, a
//! backslash, or a segment starting with `.imgfunc-` are refused, and a key
//! cannot be both an object and a folder (`a` and `a/b`; an empty folder
//! makes way for a write of its key). Symbolic links the
//! operator places under the root are followed when reading; listings do not
//! descend into linked folders.

use super::attribute;
use super::flush::GroupFlush;
use super::validate::{RESERVED_SEGMENT_PREFIX, normalize_put_options, validate_local_key};
use super::{
    Body, BoxFuture, Kept, LIST_LIMIT, ListEntry, ListPage, Object, ObjectMeta, ObjectReader,
    ObjectStore, PutOptions, ReadBody, StoreError, guess_content_type, run_blocking,
    validate_bucket,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BinaryHeap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{self, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::{OwnedRwLockReadGuard, RwLock};

/// The hidden folder under the root that holds the sidecars.
const META_DIR: &str = ".imgfunc-meta";

/// The extended attribute that holds an object's metadata. The name is short
/// because ext4 keeps a small attribute (64 bytes of value with this name)
/// inside the inode; longer metadata takes an attribute block.
const META_XATTR: &str = "user.imgfunc";

/// Temporary files start with this; it falls under the reserved prefix, so
/// no key segment can.
const TMP_PREFIX: &str = ".imgfunc-tmp-";

/// Per-key read/write ordering uses this many lock shards, so unrelated keys
/// rarely wait for each other and memory stays fixed.
const LOCK_SHARDS: usize = 64;

/// How often a put retries when a concurrent delete pruned the folder it was
/// writing into.
const PRUNE_RACE_RETRIES: usize = 3;

/// Numbers temporary files; shared by every store in the process, so two
/// stores over one root never pick the same name.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// An [`ObjectStore`] over a directory. See the module documentation for the
/// layout on disk.
#[derive(Debug)]
pub struct LocalStore {
    root: PathBuf,
    place: MetadataPlace,
    locks: Box<[Arc<RwLock<()>>]>,
    flush: Arc<GroupFlush>,
}

/// Where a [`LocalStore`] writes objects' metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MetadataPlace {
    /// In an extended attribute of the object's file, or a sidecar file
    /// where the filesystem refuses the attribute.
    #[default]
    Xattr,
    /// Always in a sidecar file under `.imgfunc-meta`, for folders that are
    /// copied or synced by tools that drop extended attributes.
    Sidecar,
}

/// An object's stored metadata, in the attribute or the sidecar.
#[derive(Debug, Serialize, Deserialize)]
struct StoredMeta {
    #[serde(rename = "type", alias = "content_type")]
    content_type: String,
    #[serde(
        rename = "meta",
        alias = "user_metadata",
        default,
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    user_metadata: BTreeMap<String, String>,
}

/// Where one object and its sidecar live, from a validated bucket and key.
#[derive(Debug)]
struct Target {
    bucket: String,
    key: String,
    bucket_dir: PathBuf,
    object: PathBuf,
    meta_bucket_dir: PathBuf,
    sidecar: PathBuf,
}

impl LocalStore {
    /// A store rooted at `root` that keeps metadata in extended attributes
    /// where it can. Nothing is touched on disk until the first write, which
    /// creates the root and the bucket folder.
    pub fn new(root: PathBuf) -> Self {
        LocalStore::with_metadata(root, MetadataPlace::Xattr)
    }

    /// A store rooted at `root` that writes metadata to `place`.
    pub fn with_metadata(root: PathBuf, place: MetadataPlace) -> Self {
        let locks = (0..LOCK_SHARDS)
            .map(|_| Arc::new(RwLock::new(())))
            .collect();
        LocalStore {
            root,
            place,
            locks,
            flush: Arc::default(),
        }
    }

    /// The folder this store keeps its buckets in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the root folder if missing, its name on disk before this
    /// returns.
    pub async fn create_root(&self) -> Result<(), StoreError> {
        self.create_folder(self.root.clone()).await
    }

    /// Creates the bucket's folder (and the root) if missing.
    pub async fn create_bucket(&self, bucket: &str) -> Result<(), StoreError> {
        validate_bucket(bucket)?;
        self.create_folder(self.root.join(bucket)).await
    }

    async fn create_folder(&self, dir: PathBuf) -> Result<(), StoreError> {
        let flush = Arc::clone(&self.flush);
        blocking(self.root.clone(), move || {
            let io = |e| StoreError::io("create folder", &dir, e);
            // The new folder's name is on disk before the bucket is reported.
            for folder in create_folders(&dir).map_err(io)? {
                flush_folder(&folder, &flush).map_err(io)?;
            }
            Ok(())
        })
        .await
    }

    fn target(&self, bucket: &str, key: &str) -> Result<Target, StoreError> {
        validate_bucket(bucket)?;
        validate_local_key(key)?;
        let bucket_dir = self.root.join(bucket);
        let meta_bucket_dir = self.root.join(META_DIR).join(bucket);
        Ok(Target {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            object: bucket_dir.join(key),
            sidecar: meta_bucket_dir.join(key),
            bucket_dir,
            meta_bucket_dir,
        })
    }

    fn lock(&self, bucket: &str, key: &str) -> Arc<RwLock<()>> {
        let mut hasher = DefaultHasher::new();
        (bucket, key).hash(&mut hasher);
        // The remainder is below LOCK_SHARDS, so the cast cannot truncate.
        let shard = (hasher.finish() % LOCK_SHARDS as u64) as usize;
        Arc::clone(&self.locks[shard])
    }

    fn read(&self, bucket: &str, key: &str, with_bytes: bool) -> BoxFuture<'_, ReadResult> {
        self.reading(bucket, key, move |target, _guard| {
            read_object(target, with_bytes)
        })
    }

    /// Runs `f` on the key's files on the blocking pool, with the key's read
    /// lock, which `f` may drop early (an open file keeps its version).
    fn reading<T: Send + 'static>(
        &self,
        bucket: &str,
        key: &str,
        f: impl FnOnce(&Target, OwnedRwLockReadGuard<()>) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFuture<'_, Result<T, StoreError>> {
        let target = self.target(bucket, key);
        let lock = self.lock(bucket, key);
        Box::pin(async move {
            let target = target?;
            let guard = lock.read_owned().await;
            blocking(self.root.clone(), move || f(&target, guard)).await
        })
    }
}

type ReadResult = Result<(Option<Bytes>, ObjectMeta), StoreError>;

impl ObjectStore for LocalStore {
    fn get(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<Object, StoreError>> {
        let read = self.read(bucket, key, true);
        Box::pin(async move {
            let (bytes, meta) = read.await?;
            Ok(Object {
                bytes: bytes.unwrap_or_default(),
                meta,
            })
        })
    }

    fn expect_write(&self) -> super::WriteIntent {
        super::WriteIntent(Some(self.flush.expect()))
    }

    fn open(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<ObjectReader, StoreError>> {
        let open = self.reading(bucket, key, |target, _guard| open_object(target));
        Box::pin(async move {
            let (file, meta) = open.await?;
            Ok(ObjectReader {
                meta,
                body: Body::File(file),
            })
        })
    }

    fn open_with(
        &self,
        bucket: &str,
        key: &str,
        read: ReadBody,
    ) -> BoxFuture<'_, Result<(ObjectMeta, Option<Kept>), StoreError>> {
        self.reading(bucket, key, move |target, guard| {
            let (file, meta) = open_object(target)?;
            drop(guard);
            let bytes = read(&meta, Body::File(file))
                .map_err(|e| StoreError::io("read", &target.object, e))?;
            Ok((meta, bytes))
        })
    }

    fn head(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<ObjectMeta, StoreError>> {
        let read = self.read(bucket, key, false);
        Box::pin(async move { Ok(read.await?.1) })
    }

    fn put(
        &self,
        bucket: &str,
        key: &str,
        bytes: Bytes,
        opts: PutOptions,
    ) -> BoxFuture<'_, Result<Option<String>, StoreError>> {
        let target = self.target(bucket, key);
        let lock = self.lock(bucket, key);
        let place = self.place;
        let flush = Arc::clone(&self.flush);
        Box::pin(async move {
            let target = target?;
            let opts = normalize_put_options(opts)?;
            let guard = lock.write_owned().await;
            blocking(self.root.clone(), move || {
                let _guard = guard;
                write_object(&target, &bytes, opts, place, &flush)
            })
            .await
        })
    }

    fn delete(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let target = self.target(bucket, key);
        let lock = self.lock(bucket, key);
        let flush = Arc::clone(&self.flush);
        Box::pin(async move {
            let target = target?;
            let guard = lock.write_owned().await;
            blocking(self.root.clone(), move || {
                let _guard = guard;
                delete_object(&target, &flush)
            })
            .await
        })
    }

    fn list_page(
        &self,
        bucket: &str,
        prefix: &str,
        start_after: &str,
    ) -> BoxFuture<'_, Result<ListPage, StoreError>> {
        let checked = validate_bucket(bucket);
        let bucket = bucket.to_owned();
        let prefix = prefix.to_owned();
        let start_after = start_after.to_owned();
        let bucket_dir = self.root.join(&bucket);
        Box::pin(async move {
            checked?;
            blocking(self.root.clone(), move || {
                list_objects(&bucket, &bucket_dir, &prefix, &start_after)
            })
            .await
        })
    }

    fn describe(&self) -> String {
        format!("local:{}", self.root.display())
    }
}

/// Runs blocking file I/O off the async runtime.
async fn blocking<T, F>(root: PathBuf, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    run_blocking("finish file operation for", "the local store", f)
        .await
        .map_err(|e| e.under_root(&root))
}

/// The error for an object that is not there: the bucket's or the key's.
fn missing(target: &Target) -> StoreError {
    if target.bucket_dir.is_dir() {
        StoreError::not_found(&target.bucket, &target.key)
    } else {
        StoreError::no_such_bucket(&target.bucket)
    }
}

fn is_missing_path(err: &io::Error) -> bool {
    matches!(err.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory)
}

fn read_object(target: &Target, with_bytes: bool) -> ReadResult {
    let (mut file, mut meta) = open_object(target)?;
    let bytes = if with_bytes {
        let mut buf = Vec::with_capacity(usize::try_from(meta.size).unwrap_or(0));
        file.read_to_end(&mut buf)
            .map_err(|e| StoreError::io("read", &target.object, e))?;
        meta.size = buf.len() as u64;
        Some(Bytes::from(buf))
    } else {
        None
    };
    Ok((bytes, meta))
}

/// Opens `path` for reading with `flags`, and without updating its access
/// time, which objects do not have: the first read of a new file would
/// otherwise dirty its inode, to be written back with the next flush. The
/// kernel allows that only to the file's owner, and some FUSE daemons
/// refuse it outright, so where the open fails for another reason than a
/// missing path it is made again without.
fn open_for_reading(path: &Path, flags: libc::c_int) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |flags| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(path)
    };
    match open(flags | libc::O_NOATIME) {
        Err(e) if !is_missing_path(&e) => open(flags),
        opened => opened,
    }
}

/// Opens an object's file and reads its metadata. The open file keeps
/// reading this version of the object even if it is replaced or deleted
/// meanwhile (writes rename a new file over it).
fn open_object(target: &Target) -> Result<(std::fs::File, ObjectMeta), StoreError> {
    // Without blocking: opening a FIFO someone left in the folder would
    // otherwise wait for a writer for ever (holding the key's lock).
    let file = match open_for_reading(&target.object, libc::O_NONBLOCK) {
        Ok(file) => file,
        Err(e) if is_missing_path(&e) => return Err(missing(target)),
        Err(e) => return Err(StoreError::io("open", &target.object, e)),
    };
    let stat = file
        .metadata()
        .map_err(|e| StoreError::io("read metadata of", &target.object, e))?;
    if !stat.is_file() {
        // A folder of longer keys, or a FIFO, socket or device: not an
        // object (listings leave them out too).
        return Err(missing(target));
    }
    let stored = match read_xattr(&file, &target.object)? {
        Some(stored) => stored,
        None => read_sidecar(&target.sidecar)?.unwrap_or_else(|| StoredMeta {
            content_type: guess_content_type(&target.key).to_owned(),
            user_metadata: BTreeMap::new(),
        }),
    };
    let modified = stat.modified().ok();
    let meta = ObjectMeta {
        content_type: stored.content_type,
        size: stat.len(),
        user_metadata: stored.user_metadata,
        last_modified: modified,
        etag: etag_of(&stat),
    };
    Ok((file, meta))
}

/// An object file's ETag: its inode, size and modification time, which a
/// rewrite changes (a new file each time). None without a time.
fn etag_of(stat: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let modified = stat.modified().ok()?;
    let since_epoch = modified.duration_since(std::time::UNIX_EPOCH).ok()?;
    Some(format!(
        "\"{:x}-{:x}-{:x}\"",
        stat.ino(),
        stat.len(),
        since_epoch.as_nanos()
    ))
}

/// The metadata attribute of an open object file, if it has one.
fn read_xattr(file: &std::fs::File, path: &Path) -> Result<Option<StoredMeta>, StoreError> {
    use xattr::FileExt;
    match file.get_xattr(META_XATTR) {
        // Attributes written as JSON by earlier versions start with `{`.
        Ok(Some(json)) if json.first() == Some(&b'{') => {
            parse_meta(&json, "parse the metadata attribute of", path).map(Some)
        }
        Ok(Some(bytes)) => match attribute::decode(&bytes) {
            Ok((content_type, user_metadata)) => Ok(Some(StoredMeta {
                content_type,
                user_metadata,
            })),
            Err(e) => Err(StoreError::io(
                "parse the metadata attribute of",
                path,
                io::Error::new(ErrorKind::InvalidData, e),
            )),
        },
        Ok(None) => Ok(None),
        // Where writes fall back to sidecars, reads do too.
        Err(e) if attribute_refused(&e) => Ok(None),
        Err(e) => Err(StoreError::io("read the metadata attribute of", path, e)),
    }
}

fn read_sidecar(path: &Path) -> Result<Option<StoredMeta>, StoreError> {
    let mut text = Vec::new();
    match open_for_reading(path, 0).and_then(|mut file| file.read_to_end(&mut text)) {
        Ok(_) => {}
        Err(e) if is_missing_path(&e) || e.kind() == ErrorKind::IsADirectory => return Ok(None),
        Err(e) => return Err(StoreError::io("read sidecar", path, e)),
    }
    parse_meta(&text, "parse sidecar", path).map(Some)
}

fn parse_meta(json: &[u8], op: &'static str, path: &Path) -> Result<StoredMeta, StoreError> {
    serde_json::from_slice(json)
        .map_err(|e| StoreError::io(op, path, io::Error::new(ErrorKind::InvalidData, e)))
}

/// Whether the first `size` bytes of `file` are all in the page cache of
/// a local disk filesystem (ext2/3/4, XFS, Btrfs) or tmpfs, so that reading
/// them copies memory and does not wait for a disk or a server: network
/// and FUSE filesystems may revalidate cached pages with their server, and
/// overlayfs and ZFS keep no pages of their own to count. Asked with
/// `cachestat` (Linux 6.5 and later); `false` where the call is missing or
/// refused (and from then on, without asking), or switched off with
/// [`set_page_cache_check`]. Pages may still be evicted between the answer
/// and a read (rarely: they were just in use).
pub fn resident(file: &std::fs::File, size: u64) -> bool {
    if !PAGE_CACHE_CHECK.load(Ordering::Relaxed) {
        return false;
    }
    match super::flush::filesystem(file) {
        Ok(fs) if super::flush::local_disk_or_tmpfs(&fs) => {}
        _ => return false,
    }
    match cached_pages(file, size) {
        Ok(cached) => cached >= size.div_ceil(page_size()),
        Err(e) => {
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOSYS | libc::EPERM | libc::EOPNOTSUPP | libc::EINVAL)
            ) {
                PAGE_CACHE_CHECK.store(false, Ordering::Relaxed);
            }
            false
        }
    }
}

/// Drops `path`'s bytes from the page cache (flushed first: only clean
/// pages can go), as if it had not been read for a long while; for tests
/// of [`resident`] and of its callers.
#[cfg(test)]
pub(crate) fn evict(path: &Path) {
    use std::os::unix::io::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    file.sync_all().unwrap();
    // SAFETY: the descriptor is open; offset 0 and length 0 cover the file.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
}

/// Whether [`resident`] asks the kernel: cleared for the process when the
/// call is missing or refused, or by [`set_page_cache_check`].
static PAGE_CACHE_CHECK: AtomicBool = AtomicBool::new(true);

/// Switches [`resident`]'s question to the kernel on or off for the
/// process (off: every source is read on the blocking pool), for sandboxes
/// whose system call filter kills a process for a call it does not know.
pub fn set_page_cache_check(on: bool) {
    PAGE_CACHE_CHECK.store(on, Ordering::Relaxed);
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .unwrap_or(4096)
        .max(1)
}

/// `cachestat`'s number, 451, on the architectures that share it; the
/// call is not made elsewhere. (The store is for Linux: it also relies on
/// `O_TMPFILE` and `/proc`.)
const SYS_CACHESTAT: Option<libc::c_long> = if cfg!(all(
    target_os = "linux",
    any(
        all(target_arch = "x86_64", target_pointer_width = "64"),
        target_arch = "aarch64",
        target_arch = "riscv64"
    )
)) {
    Some(451)
} else {
    None
};

/// Pages of the first `size` bytes of `file` in the page cache
/// (`cachestat`).
fn cached_pages(file: &std::fs::File, size: u64) -> io::Result<u64> {
    use std::os::unix::io::AsRawFd;
    /// The kernel's `struct cachestat_range` and `struct cachestat`.
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    let Some(call) = SYS_CACHESTAT else {
        return Err(io::Error::from_raw_os_error(libc::ENOSYS));
    };
    if size == 0 {
        return Ok(0);
    }
    let range = Range { off: 0, len: size };
    let mut stat = Stat::default();
    // SAFETY: the descriptor is open, and both pointers are valid for the
    // call's duration, to structures of the layout it expects.
    let rc = unsafe {
        libc::syscall(
            call,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0u32,
        )
    };
    if rc == 0 {
        Ok(stat.nr_cache)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn write_object(
    target: &Target,
    bytes: &[u8],
    opts: PutOptions,
    place: MetadataPlace,
    flush: &GroupFlush,
) -> Result<Option<String>, StoreError> {
    check_not_shadowed(target, true)?;
    let stored = StoredMeta {
        content_type: opts.content_type,
        user_metadata: opts.user_metadata,
    };
    let attribute = (place == MetadataPlace::Xattr)
        .then(|| attribute::encode(&stored.content_type, &stored.user_metadata));
    // A write of a longer or shorter key (`a/b` against `a`) may have made
    // the clash since the check: it is reported as such, not as the I/O
    // error it caused. Where the other writer has only made an empty
    // folder so far, the check removes it and this write goes again (and
    // the other one meets the clash).
    // Folders made by any attempt are flushed with the write that succeeds.
    let mut made = Vec::new();
    // Metadata the file cannot carry goes to the sidecar before the file
    // gets its name: a sidecar write that fails (a full disk) then fails
    // the put with the old object still in place, not the new bytes under
    // the old object's metadata or none.
    let sidecar = || -> Result<(), StoreError> {
        clear_stale_sidecars(target)?;
        let json = serde_json::to_vec(&stored).map_err(|e| {
            StoreError::io("encode metadata of", &target.object, io::Error::other(e))
        })?;
        // Its folders are flushed by its own write.
        write_atomic(&target.sidecar, &json, None, None, flush, &mut Vec::new()).map(drop)
    };
    let write = |made: &mut Vec<PathBuf>| {
        write_atomic(
            &target.object,
            bytes,
            attribute.as_deref(),
            Some(&sidecar),
            flush,
            made,
        )
    };
    let written = match write(&mut made) {
        Ok(written) => written,
        Err(e) if clash_like(&e) => {
            check_not_shadowed(target, true)?;
            // Still failing: a folder at the key now is the other writer's
            // (left in place), a file above it the other object.
            write(&mut made).or_else(|e| check_not_shadowed(target, false).and(Err(e)))?
        }
        Err(e) => return Err(e),
    };
    if written.attribute {
        // The new file carries its metadata; an older sidecar would only
        // confuse a later reader of the folder.
        remove_file_if_present(&target.sidecar, "remove the old sidecar")?;
    }
    Ok(etag_of(&written.stat))
}

/// Whether a failed write may have met a write of a longer or shorter key
/// (a folder where its file goes, a file where its folder goes, or a
/// folder removed under it).
fn clash_like(err: &StoreError) -> bool {
    matches!(err, StoreError::Io { source, .. } if matches!(
        source.raw_os_error(),
        Some(libc::EISDIR | libc::ENOTDIR | libc::EEXIST | libc::ENOENT | libc::ENOTEMPTY)
    ))
}

/// Whether a refused metadata attribute should go to a sidecar instead:
/// the filesystem has no user attributes, the value does not fit, or a
/// security module or mount option forbids them (EPERM, EACCES). A real
/// write problem shows again when the sidecar is written.
fn attribute_refused(err: &io::Error) -> bool {
    err.kind() == ErrorKind::Unsupported
        || matches!(
            err.raw_os_error(),
            Some(
                libc::E2BIG
                    | libc::ENOSPC
                    | libc::ERANGE
                    | libc::EOPNOTSUPP
                    | libc::EPERM
                    | libc::EACCES
            )
        )
}

/// Refuses a key that would need a file where a folder is, or the reverse:
/// the local store cannot hold both `a` and `a/b`. An empty folder where
/// the key's file belongs is removed to make way for it if `make_way`, and
/// refused like any other otherwise.
fn check_not_shadowed(target: &Target, make_way: bool) -> Result<(), StoreError> {
    for (prefix, last) in key_paths(&target.key) {
        let path = target.bucket_dir.join(prefix);
        // A folder is looked at itself, not through a link (see below).
        let stat = if last {
            std::fs::metadata(&path)
        } else {
            std::fs::symlink_metadata(&path)
        };
        let Ok(stat) = stat else {
            // Missing (or unreadable, which the write will report): no clash.
            return Ok(());
        };
        if !last && stat.file_type().is_symlink() {
            return Err(linked_folder(target, prefix));
        }
        // An empty folder holds no object (a write that failed after
        // making it, or one made by hand): it makes way for the key. A
        // writer of a longer key that has just made it may then find it
        // gone and make it again, or meet this key's file and report the
        // clash (see `write_object`).
        if last && stat.is_dir() {
            let objects_under = || {
                StoreError::invalid_key(
                    &target.key,
                    format!(
                        "the local store keeps keys as files and folders, and objects under \"{prefix}/\" exist"
                    ),
                )
            };
            if !make_way {
                return Err(objects_under());
            }
            match std::fs::remove_dir(&path) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {
                    return Err(objects_under());
                }
                // A link to a folder is not removed through.
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                    return Err(linked_folder(target, prefix));
                }
                // A mount point, a read-only folder: not for this write to change.
                Err(e) => return Err(StoreError::io("remove the empty folder", &path, e)),
            }
        }
        if !last && !stat.is_dir() {
            return Err(StoreError::invalid_key(
                &target.key,
                format!(
                    "the local store keeps keys as files and folders, and {prefix:?} is already an object"
                ),
            ));
        }
    }
    Ok(())
}

/// Links the operator placed under the root are followed when reading;
/// writes and deletes do not go through a linked folder, which could lead
/// anywhere on the machine.
fn linked_folder(target: &Target, prefix: &str) -> StoreError {
    StoreError::invalid_key(
        &target.key,
        format!(
            "{prefix:?} is a link to a folder; the local store writes and deletes only in its own folders"
        ),
    )
}

/// The first folder of `target`'s key that is a link, for a delete (a
/// write finds it in [`check_not_shadowed`]).
fn check_no_linked_folder(target: &Target) -> Result<(), StoreError> {
    for (prefix, _) in key_paths(&target.key).filter(|(_, last)| !last) {
        match std::fs::symlink_metadata(target.bucket_dir.join(prefix)) {
            Ok(stat) if stat.file_type().is_symlink() => {
                return Err(linked_folder(target, prefix));
            }
            Ok(_) => {}
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

/// The folders of `key`, then the key itself (`a`, `a/b`, `a/b/c` for
/// `a/b/c`), each with whether it is the key.
fn key_paths(key: &str) -> impl Iterator<Item = (&str, bool)> {
    key.match_indices('/')
        .map(|(end, _)| (&key[..end], false))
        .chain(std::iter::once((key, true)))
}

/// Removes sidecars left behind by an interrupted delete that would stand in
/// the new sidecar's way. The object tree was checked, so they are orphans.
fn clear_stale_sidecars(target: &Target) -> Result<(), StoreError> {
    let mut path = target.meta_bucket_dir.clone();
    let mut segments = target.key.split('/').peekable();
    while let Some(segment) = segments.next() {
        path.push(segment);
        let Ok(stat) = std::fs::symlink_metadata(&path) else {
            return Ok(());
        };
        let last = segments.peek().is_none();
        let result = match (last, stat.is_dir()) {
            (true, true) => std::fs::remove_dir_all(&path),
            (false, false) => std::fs::remove_file(&path),
            _ => continue,
        };
        return result.map_err(|e| StoreError::io("remove stale sidecar", &path, e));
    }
    Ok(())
}

/// Writes `bytes` to a new file in `path`'s folder, with `attribute` as its
/// metadata attribute when given, flushes it to disk (with other writes
/// that come at the same time: [`GroupFlush`]) and only then gives it the
/// name `path`, so that a reader sees the old object or the whole new one.
/// Returns whether the attribute was stored.
///
/// The new file is unnamed (`O_TMPFILE`) where the filesystem allows, and
/// linked under `path` once flushed: on ext4 that saves a directory entry,
/// a rename, and the flush of the parent folder that `fsync` does for a
/// newly named file (1.4 of 5.4 disk writes per object here, with `fsync`
/// per file). Replacing an
/// existing object, or where unnamed files are not available, the file has
/// a hidden temporary name and is renamed over `path`.
///
/// `made` gathers the folders that got new folders for this write, over
/// every attempt: where files are flushed one by one, they are flushed
/// before the write is reported.
fn write_atomic(
    path: &Path,
    bytes: &[u8],
    attribute: Option<&[u8]>,
    sidecar: Option<&dyn Fn() -> Result<(), StoreError>>,
    flush: &GroupFlush,
    made: &mut Vec<PathBuf>,
) -> Result<Written, StoreError> {
    write_staged(
        path,
        bytes,
        attribute,
        sidecar,
        unnamed_files(),
        flush,
        made,
    )
}

/// A file written and named.
struct Written {
    /// Whether the metadata attribute went on the file (else to a sidecar,
    /// or there was none).
    attribute: bool,
    /// The file as written, for its ETag.
    stat: std::fs::Metadata,
}

/// [`write_atomic`] with unnamed files (`unnamed`) or named ones.
fn write_staged(
    path: &Path,
    bytes: &[u8],
    attribute: Option<&[u8]>,
    sidecar: Option<&dyn Fn() -> Result<(), StoreError>>,
    unnamed: bool,
    flush: &GroupFlush,
    made: &mut Vec<PathBuf>,
) -> Result<Written, StoreError> {
    use xattr::FileExt;
    let dir = path
        .parent()
        .ok_or_else(|| StoreError::io("write", path, ErrorKind::InvalidInput.into()))?;
    let mut staged = stage(dir, unnamed, made)?;
    let mut sidecar_failed = None;
    let mut write = || -> io::Result<Written> {
        staged.file.write_all(bytes)?;
        let stored = match attribute {
            Some(value) => match staged.file.set_xattr(META_XATTR, value) {
                Ok(()) => true,
                Err(e) if attribute_refused(&e) => false,
                Err(e) => return Err(e),
            },
            None => false,
        };
        if !stored
            && let Some(write_sidecar) = sidecar
            && let Err(e) = write_sidecar()
        {
            sidecar_failed = Some(e);
            return Err(io::Error::other("the metadata's sidecar was not written"));
        }
        // Named once on disk, and the name goes to disk too before the
        // write is reported, so an object a client was told about survives
        // a crash.
        let publication = staged.publication(path);
        let (published, names_flushed) =
            flush.flush_then(&staged.file, move || publication.run())?;
        made.extend(staged.published(published)?);
        if !names_flushed {
            // Flushed file by file: the new name, and the entries of any
            // folders made for it.
            flush_folder(dir, flush)?;
            made.sort();
            made.dedup();
            for folder in made.iter() {
                flush_folder(folder, flush)?;
            }
        }
        // Naming and flushing leave its time and size as written.
        let stat = staged.file.metadata()?;
        Ok(Written {
            attribute: stored,
            stat,
        })
    };
    match write() {
        Ok(written) => Ok(written),
        // Linking through /proc can be refused where unnamed files are
        // allowed (a sandbox, /proc mounted with restrictions): the process
        // goes back to named temporary files, and this write starts over.
        Err(e) if staged.link_failed.get() && staged.name.is_none() && link_refused(&e) => {
            UNNAMED_FILES.store(false, Ordering::Relaxed);
            drop(staged);
            write_staged(path, bytes, attribute, sidecar, false, flush, made)
        }
        Err(e) => {
            // Best effort: the write already failed, and the name is hidden
            // from listings if the removal fails too. An unnamed file goes
            // when it is closed.
            if let Some(tmp) = &staged.name {
                let _ = std::fs::remove_file(tmp);
            }
            Err(sidecar_failed.unwrap_or_else(|| StoreError::io("write", path, e)))
        }
    }
}

/// Whether linking an unnamed file failed because the system does not allow
/// it, rather than because of the target (which a named write would meet
/// too).
fn link_refused(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(
            libc::EPERM
                | libc::EACCES
                | libc::EXDEV
                | libc::EINVAL
                | libc::ENOSYS
                | libc::EOPNOTSUPP
        )
    )
}

/// A file being written before it is published under its object's name.
struct Staged {
    file: std::fs::File,
    /// The hidden temporary name, or `None` for an unnamed file.
    name: Option<PathBuf>,
    /// Whether linking the unnamed file failed: only then can an error say
    /// the system refuses such links (a refused rename over an object
    /// does not).
    link_failed: std::cell::Cell<bool>,
}

/// Whether unnamed files can be used: cleared for the process the first
/// time the filesystem refuses `O_TMPFILE`. Linking one needs `/proc`.
static UNNAMED_FILES: AtomicBool = AtomicBool::new(true);

fn unnamed_files() -> bool {
    static PROC_FD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    UNNAMED_FILES.load(Ordering::Relaxed)
        && *PROC_FD.get_or_init(|| Path::new("/proc/self/fd").is_dir())
}

/// A hidden name for a temporary file in `dir`, unique in the process.
fn temp_name(dir: &Path) -> PathBuf {
    dir.join(format!(
        "{TMP_PREFIX}{}-{}",
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Creates a new file in `dir`, unnamed if `unnamed` and the filesystem
/// allows, and `dir` itself when it is missing (a concurrent delete may
/// prune it between the two steps, so that is retried).
fn stage(dir: &Path, mut unnamed: bool, made: &mut Vec<PathBuf>) -> Result<Staged, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut attempt = 0;
    loop {
        let (opened, name) = if unnamed {
            let opened = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_TMPFILE)
                .open(dir);
            // Filesystems without unnamed files say so in one of these ways
            // (an old kernel takes the flag for O_DIRECTORY).
            if let Err(e) = &opened
                && matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
                )
            {
                UNNAMED_FILES.store(false, Ordering::Relaxed);
                unnamed = false;
                continue;
            }
            (opened, None)
        } else {
            let tmp = temp_name(dir);
            let opened = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp);
            (opened, Some(tmp))
        };
        match opened {
            Ok(file) => {
                return Ok(Staged {
                    file,
                    name,
                    link_failed: std::cell::Cell::new(false),
                });
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == ErrorKind::NotFound && attempt <= PRUNE_RACE_RETRIES => {
                made.extend(
                    create_folders(dir).map_err(|e| StoreError::io("create folder", dir, e))?,
                );
            }
            Err(e) => return Err(StoreError::io("create temporary file in", dir, e)),
        }
        attempt += 1;
    }
}

impl Staged {
    /// What naming the file `path` takes, for whichever thread does it.
    fn publication(&self, path: &Path) -> Publication {
        use std::os::unix::io::AsRawFd;
        Publication {
            fd: self.file.as_raw_fd(),
            name: self.name.clone(),
            path: path.to_owned(),
        }
    }

    /// Takes in how naming the file went; gives the folders it created
    /// folders in.
    fn published(&self, published: Published) -> io::Result<Vec<PathBuf>> {
        self.link_failed.set(published.link_failed);
        published.result.map(|()| published.created_in)
    }
}

/// Naming a staged file, owned, so that the leader of its flush batch can
/// do it on the writer's behalf (see [`GroupFlush::flush_then`]).
struct Publication {
    /// The staged file's descriptor, which its writer keeps open meanwhile.
    fd: std::os::unix::io::RawFd,
    /// The staged file's temporary name, or `None` for an unnamed file.
    name: Option<PathBuf>,
    path: PathBuf,
}

/// How a [`Publication`] went.
struct Published {
    result: io::Result<()>,
    /// Whether linking the unnamed file failed (see [`Staged::link_failed`]).
    link_failed: bool,
    /// Folders whose entries changed because folders were created in them.
    created_in: Vec<PathBuf>,
}

impl Publication {
    fn run(self) -> Published {
        let mut link_failed = false;
        let mut created_in = Vec::new();
        let result = self.publish(&mut link_failed, &mut created_in);
        Published {
            result,
            link_failed,
            created_in,
        }
    }

    /// Gives the written file the name `path`, replacing any object there.
    fn publish(&self, link_failed: &mut bool, created_in: &mut Vec<PathBuf>) -> io::Result<()> {
        let path = &self.path;
        if let Some(tmp) = &self.name {
            return std::fs::rename(tmp, path);
        }
        let dir = path.parent().ok_or(ErrorKind::InvalidInput)?;
        let mut attempt = 0;
        loop {
            match self.link(path, link_failed) {
                Ok(()) => return Ok(()),
                // Replacing an object: a temporary name first, then a
                // rename over it, which is atomic where a link is not.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let tmp = temp_name(dir);
                    self.link(&tmp, link_failed)?;
                    return std::fs::rename(&tmp, path).inspect_err(|_| {
                        let _ = std::fs::remove_file(&tmp);
                    });
                }
                // A concurrent delete pruned the folder: the unnamed file
                // can go into a new one.
                Err(e) if e.kind() == ErrorKind::NotFound && attempt < PRUNE_RACE_RETRIES => {
                    created_in.extend(create_folders(dir)?);
                }
                Err(e) => return Err(e),
            }
            attempt += 1;
        }
    }

    /// Links the unnamed file under `to`.
    fn link(&self, to: &Path, link_failed: &mut bool) -> io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let from = std::ffi::CString::new(format!("/proc/self/fd/{}", self.fd))?;
        let to = std::ffi::CString::new(to.as_os_str().as_bytes())?;
        // SAFETY: both arguments are NUL-terminated strings that outlive
        // the call; linkat only reads them.
        let rc = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        // Only the last link tells: one that failed before a retry (a
        // pruned folder made again) says nothing about the write.
        if rc == 0 {
            *link_failed = false;
            Ok(())
        } else {
            let error = io::Error::last_os_error();
            *link_failed = error.kind() != ErrorKind::AlreadyExists;
            Err(error)
        }
    }
}

fn delete_object(target: &Target, flush: &GroupFlush) -> Result<(), StoreError> {
    if !target.bucket_dir.is_dir() {
        return Err(StoreError::no_such_bucket(&target.bucket));
    }
    check_no_linked_folder(target)?;
    let removed = remove_file_if_present(&target.object, "delete")?;
    let removed_sidecar = remove_file_if_present(&target.sidecar, "delete sidecar")?;
    prune_empty_folders(&target.object, &target.bucket_dir);
    prune_empty_folders(&target.sidecar, &target.meta_bucket_dir);
    // The removal goes to disk before it is reported (and its event fires),
    // so a deleted object does not come back after a crash.
    for (gone, path) in [
        (removed, &target.object),
        (removed_sidecar, &target.sidecar),
    ] {
        if let Some(folder) = path
            .ancestors()
            .skip(1)
            .find(|d| d.is_dir())
            .filter(|_| gone)
        {
            flush_folder(folder, flush).map_err(|e| StoreError::io("delete", path, e))?;
        }
    }
    Ok(())
}

/// Creates `dir` and the missing folders above it, and returns the
/// folders that got a new entry (the parent of each folder made, or found
/// made by another writer meanwhile), for writers that flush folders
/// themselves: a file's folder flushed alone does not keep a new folder's
/// name through a crash.
fn create_folders(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut changed = Vec::new();
    let mut attempt = 0;
    'start: loop {
        // What is not there at all: a file in the way is left to the
        // creation below it to report (not a directory).
        let missing: Vec<&Path> = dir
            .ancestors()
            .take_while(|folder| {
                folder.parent().is_some()
                    && matches!(std::fs::metadata(folder), Err(e) if e.kind() == ErrorKind::NotFound)
            })
            .collect();
        if missing.is_empty() && !dir.is_dir() {
            // Something other than a folder is in the way (a file at or
            // above it): the system's own error says what.
            std::fs::create_dir(dir)?;
            changed.extend(dir.parent().map(Path::to_path_buf));
        }
        for folder in missing.into_iter().rev() {
            match std::fs::create_dir(folder) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists && folder.is_dir() => {}
                // A delete pruned a folder above it meanwhile: start over.
                Err(e) if e.kind() == ErrorKind::NotFound && attempt < PRUNE_RACE_RETRIES => {
                    attempt += 1;
                    continue 'start;
                }
                Err(e) => return Err(e),
            }
            let parent = folder.parent().filter(|p| !p.as_os_str().is_empty());
            changed.push(parent.unwrap_or(Path::new(".")).to_path_buf());
        }
        return Ok(changed);
    }
}

/// Flushes `folder`'s entries (a new or removed name) with the group flush.
fn flush_folder(folder: &Path, flush: &GroupFlush) -> io::Result<()> {
    flush.flush(&std::fs::File::open(folder)?)
}

/// Removes the file at `path` if there is one; says whether it did.
fn remove_file_if_present(path: &Path, op: &'static str) -> Result<bool, StoreError> {
    match std::fs::symlink_metadata(path) {
        Ok(stat) if !stat.is_dir() => {}
        // A folder of longer keys, or nothing: no object to delete.
        Ok(_) => return Ok(false),
        Err(e) if is_missing_path(&e) => return Ok(false),
        Err(e) => return Err(StoreError::io(op, path, e)),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if is_missing_path(&e) => Ok(false),
        Err(e) => Err(StoreError::io(op, path, e)),
    }
}

/// Removes the now-empty folders between `path` and `stop` (exclusive), so a
/// deleted key leaves no folder behind. Stops at the first folder that is not
/// empty or cannot be removed; that is never an error.
fn prune_empty_folders(path: &Path, stop: &Path) {
    let mut dir = path.parent();
    while let Some(d) = dir {
        if d == stop || !d.starts_with(stop) || std::fs::remove_dir(d).is_err() {
            return;
        }
        dir = d.parent();
    }
}

/// A folder's entry in a listing's walk: a file's key, or a folder's key
/// with its `/`, which sorts where every key under it does.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Item {
    key: String,
    is_dir: bool,
    path: PathBuf,
}

/// A folder being walked in key order: the smallest of its entries not yet
/// walked, last first, whether it holds more than were kept, and the key of
/// the last entry walked.
struct Level {
    dir: PathBuf,
    dir_key: String,
    items: Vec<Item>,
    more: bool,
    walked: Option<String>,
}

/// What a listing walks: its bucket's folder, prefix and `start_after`.
struct Walk<'a> {
    bucket_dir: &'a Path,
    prefix: &'a str,
    start_after: &'a str,
}

impl Walk<'_> {
    /// The `room` smallest entries of `dir` that may hold keys of the page:
    /// under the prefix, after `start_after` (a folder `start_after` runs
    /// into is walked), and after `walked`, the last entry of this folder
    /// a walk has taken. Files named like our temporary files, names that
    /// are not UTF-8 and keys the store refuses are left out.
    fn level(
        &self,
        dir: &Path,
        dir_key: &str,
        walked: Option<&str>,
        room: usize,
    ) -> Result<Level, StoreError> {
        let mut level = Level {
            dir: dir.to_path_buf(),
            dir_key: dir_key.to_string(),
            items: Vec::new(),
            more: false,
            walked: walked.map(str::to_string),
        };
        let reader = match std::fs::read_dir(dir) {
            Ok(reader) => reader,
            // Pruned by a concurrent delete.
            Err(e) if is_missing_path(&e) => return Ok(level),
            // A subfolder the server may not read (a mount point's
            // `lost+found`) holds no objects it could serve: skipped, as
            // unreadable files are. The bucket folder itself must be read.
            Err(e) if dir != self.bucket_dir && e.kind() == ErrorKind::PermissionDenied => {
                tracing::warn!(folder = %dir.display(), "listing skips a folder it may not read");
                return Ok(level);
            }
            Err(e) => return Err(StoreError::io("list", dir, e)),
        };
        // The smallest `room`, in a heap whose top is the greatest.
        let mut kept: BinaryHeap<Item> = BinaryHeap::new();
        for entry in reader {
            let entry = entry.map_err(|e| StoreError::io("list", dir, e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with(TMP_PREFIX) {
                continue;
            }
            let Ok(file_type) = entry.file_type() else {
                continue;
            };
            let is_dir = file_type.is_dir();
            // No key under a reserved folder is served.
            if is_dir && name.starts_with(RESERVED_SEGMENT_PREFIX) {
                continue;
            }
            let key = match is_dir {
                true => format!("{dir_key}{name}/"),
                false => format!("{dir_key}{name}"),
            };
            let wanted = if is_dir {
                // Every key under a folder sorts as the folder's own does,
                // unless the prefix or `start_after` runs into it.
                (key.starts_with(self.prefix) || self.prefix.starts_with(&key))
                    && (key.as_str() > self.start_after || self.start_after.starts_with(&key))
            } else {
                key.starts_with(self.prefix)
                    && key.as_str() > self.start_after
                    && validate_local_key(&key).is_ok()
            };
            if !wanted || walked.is_some_and(|w| key.as_str() <= w) {
                continue;
            }
            if kept.len() == room && kept.peek().is_some_and(|top| top.key <= key) {
                level.more = true;
                continue;
            }
            kept.push(Item {
                key,
                is_dir,
                path: entry.path(),
            });
            if kept.len() > room {
                kept.pop();
                level.more = true;
            }
        }
        // Greatest first, so that the smallest is popped first.
        level.items = kept.into_sorted_vec();
        level.items.reverse();
        Ok(level)
    }
}

/// The first [`LIST_LIMIT`] keys of `bucket` under `prefix` after
/// `start_after` (see [`list_walk`]).
fn list_objects(
    bucket: &str,
    bucket_dir: &Path,
    prefix: &str,
    start_after: &str,
) -> Result<ListPage, StoreError> {
    list_walk(bucket, bucket_dir, prefix, start_after, LIST_LIMIT)
}

/// The first `limit` keys of `bucket` under `prefix` after `start_after`,
/// found by walking its folders in key order and stopping at the first key
/// past the page: a page costs its own keys' `stat` calls and the folders
/// on its way, however many keys follow it. A folder is read whole, but
/// the walk keeps `limit` + 1 entries in all (the smallest of each folder
/// on its way, the deepest first); a folder whose entries were not all
/// kept is read again after the last one walked.
fn list_walk(
    bucket: &str,
    bucket_dir: &Path,
    prefix: &str,
    start_after: &str,
    limit: usize,
) -> Result<ListPage, StoreError> {
    if !bucket_dir.is_dir() {
        return Err(StoreError::no_such_bucket(bucket));
    }
    let walk = Walk {
        bucket_dir,
        prefix,
        start_after,
    };
    // One more than the page, to tell whether the page is the last. Each
    // folder is read for as many (a folder of entries that give no key,
    // read for fewer, would be read again and again).
    let room = limit + 1;
    let mut entries: Vec<ListEntry> = Vec::new();
    let mut stack = vec![walk.level(bucket_dir, "", None, room)?];
    let mut truncated = false;
    while let Some(level) = stack.last_mut() {
        let Some(item) = level.items.pop() else {
            // A folder with entries left unkept is read again after the
            // last one walked.
            if let Some(done) = stack.pop().filter(|done| done.more) {
                let walked = done.walked.as_deref();
                stack.push(walk.level(&done.dir, &done.dir_key, walked, room)?);
                keep_at_most(&mut stack, room);
            }
            continue;
        };
        level.walked = Some(item.key.clone());
        if item.is_dir {
            stack.push(walk.level(&item.path, &item.key, None, room)?);
            keep_at_most(&mut stack, room);
            continue;
        }
        // Follows symbolic links, so a linked file lists like a copy.
        let Ok(stat) = std::fs::metadata(&item.path) else {
            continue;
        };
        if !stat.is_file() {
            continue;
        }
        if entries.len() == limit {
            truncated = true;
            break;
        }
        entries.push(ListEntry {
            key: item.key,
            size: stat.len(),
            last_modified: stat.modified().ok(),
        });
    }
    Ok(ListPage { entries, truncated })
}

/// Holds the walk's kept entries to `budget` in all by dropping the
/// greatest, which are walked last, from the shallowest folders first; a
/// folder that lost some is read again for them. Without it, each folder
/// of a deep path could keep a page's worth.
fn keep_at_most(stack: &mut [Level], budget: usize) {
    let mut total: usize = stack.iter().map(|level| level.items.len()).sum();
    for level in stack.iter_mut() {
        if total <= budget {
            break;
        }
        // Greatest first in `items`.
        let cut = (total - budget).min(level.items.len());
        if cut > 0 {
            level.items.drain(..cut);
            level.more = true;
            total -= cut;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DEFAULT_CONTENT_TYPE;

    fn store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("root"));
        (dir, store)
    }

    /// Whether the filesystem under `dir` takes user extended attributes;
    /// where it does not, an attribute store must fall back to sidecars.
    fn takes_attributes(dir: &Path) -> bool {
        let probe = dir.join("probe");
        std::fs::write(&probe, b"").unwrap();
        let taken = xattr::set(&probe, "user.probe", b"1").is_ok();
        std::fs::remove_file(&probe).unwrap();
        taken
    }

    fn sidecar_store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::with_metadata(dir.path().join("root"), MetadataPlace::Sidecar);
        (dir, store)
    }

    fn opts(content_type: &str, meta: &[(&str, &str)]) -> PutOptions {
        PutOptions {
            content_type: content_type.into(),
            user_metadata: meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Every file under `dir`, relative, sorted.
    fn files_under(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(d) = pending.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    pending.push(path);
                } else {
                    let rel = path.strip_prefix(dir).unwrap();
                    out.push(rel.to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn round_trips_bytes_and_metadata() {
        for (dir, store) in [store(), sidecar_store()] {
            round_trip(&store).await;
            let files = files_under(dir.path());
            if store.place == MetadataPlace::Sidecar || !takes_attributes(dir.path()) {
                assert_eq!(
                    files,
                    ["root/.imgfunc-meta/photos/a.jpg", "root/photos/a.jpg"]
                );
            } else {
                // One file: the metadata travels in its attribute.
                assert_eq!(files, ["root/photos/a.jpg"]);
                let value = xattr::get(store.root().join("photos/a.jpg"), META_XATTR)
                    .unwrap()
                    .unwrap();
                assert_eq!(value, b"\x01\x01\x00\x04rule\x06thumbs\x00\x01x\x011");
            }
        }
    }

    async fn round_trip(store: &LocalStore) {
        let body = Bytes::from_static(b"\xff\xd8 not really a jpeg");
        store
            .put(
                "photos",
                "a.jpg",
                body.clone(),
                opts("image/jpeg", &[("Rule", "thumbs"), ("x", "1")]),
            )
            .await
            .unwrap();

        let object = store.get("photos", "a.jpg").await.unwrap();
        assert_eq!(object.bytes, body);
        assert_eq!(object.meta.content_type, "image/jpeg");
        assert_eq!(object.meta.size, body.len() as u64);
        assert_eq!(object.meta.user_metadata["rule"], "thumbs");
        assert_eq!(object.meta.user_metadata["x"], "1");
        assert!(object.meta.last_modified.is_some());

        let meta = store.head("photos", "a.jpg").await.unwrap();
        assert_eq!(meta, object.meta);
        assert_eq!(
            store.describe(),
            format!("local:{}", store.root().display())
        );
    }

    #[tokio::test]
    async fn old_sidecars_are_read_and_replaced_by_the_attribute() {
        let (_dir, store) = store();
        // As an earlier version left it: a sidecar with the long names.
        std::fs::create_dir_all(store.root().join("b")).unwrap();
        std::fs::create_dir_all(store.root().join(".imgfunc-meta/b")).unwrap();
        std::fs::write(store.root().join("b/k.bin"), b"old").unwrap();
        std::fs::write(
            store.root().join(".imgfunc-meta/b/k.bin"),
            br#"{"content_type":"image/png","user_metadata":{"a":"1"}}"#,
        )
        .unwrap();
        let meta = store.head("b", "k.bin").await.unwrap();
        assert_eq!(meta.content_type, "image/png");
        assert_eq!(meta.user_metadata["a"], "1");

        store
            .put(
                "b",
                "k.bin",
                Bytes::from_static(b"new"),
                opts("text/plain", &[]),
            )
            .await
            .unwrap();
        let object = store.get("b", "k.bin").await.unwrap();
        assert_eq!(&object.bytes[..], b"new");
        assert_eq!(object.meta.content_type, "text/plain");
        assert!(object.meta.user_metadata.is_empty());
        let sidecar = store.root().join(".imgfunc-meta/b/k.bin");
        assert_eq!(sidecar.exists(), !takes_attributes(store.root()));
    }

    #[tokio::test]
    async fn reads_leave_the_access_time_alone() {
        use std::os::unix::fs::MetadataExt;
        for (_dir, store) in [store(), sidecar_store()] {
            let body = Bytes::from(vec![7u8; 100_000]);
            store
                .put(
                    "b",
                    "k.bin",
                    body.clone(),
                    opts("text/plain", &[("a", "1")]),
                )
                .await
                .unwrap();
            // The object's file, and its sidecar where the metadata is one.
            let files: Vec<PathBuf> = [
                store.root().join("b/k.bin"),
                store.root().join(".imgfunc-meta/b/k.bin"),
            ]
            .into_iter()
            .filter(|path| path.exists())
            .collect();
            // Access times a day before the last change, which a read would
            // update under both `relatime` and `strictatime`.
            for path in &files {
                let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
                let old = mtime - std::time::Duration::from_secs(86_400);
                let file = std::fs::File::options().write(true).open(path).unwrap();
                file.set_times(std::fs::FileTimes::new().set_accessed(old))
                    .unwrap();
            }
            let atimes = || {
                files
                    .iter()
                    .map(|path| {
                        let meta = std::fs::metadata(path).unwrap();
                        (meta.atime(), meta.atime_nsec())
                    })
                    .collect::<Vec<_>>()
            };
            let before = atimes();

            let object = store.get("b", "k.bin").await.unwrap();
            assert_eq!(
                (object.bytes, object.meta.user_metadata["a"].as_str()),
                (body.clone(), "1")
            );
            let opened = store.open("b", "k.bin").await.unwrap();
            let read = tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                opened.body.into_reader().read_to_end(&mut out).unwrap();
                out
            })
            .await
            .unwrap();
            assert_eq!(read, body);
            assert_eq!(
                atimes(),
                before,
                "a read through the store set an access time: {files:?}"
            );

            // The control: plain reads do set them, unless the filesystem
            // is mounted without access times.
            for path in &files {
                std::fs::read(path).unwrap();
            }
            if atimes() == before {
                eprintln!("this filesystem keeps no access times; nothing was tested");
            }
        }
    }

    #[tokio::test]
    async fn a_sidecar_store_reads_attributes_and_the_reverse() {
        let (dir, xattr_store) = store();
        let sidecar_store =
            LocalStore::with_metadata(dir.path().join("root"), MetadataPlace::Sidecar);
        xattr_store
            .put("b", "x", Bytes::from_static(b"1"), opts("image/gif", &[]))
            .await
            .unwrap();
        sidecar_store
            .put("b", "y", Bytes::from_static(b"2"), opts("image/bmp", &[]))
            .await
            .unwrap();
        for store in [&xattr_store, &sidecar_store] {
            assert_eq!(
                store.head("b", "x").await.unwrap().content_type,
                "image/gif"
            );
            assert_eq!(
                store.head("b", "y").await.unwrap().content_type,
                "image/bmp"
            );
        }
        // A sidecar write over an attribute object: the new file has no
        // attribute, so its sidecar is what is read.
        sidecar_store
            .put("b", "x", Bytes::from_static(b"3"), opts("image/tiff", &[]))
            .await
            .unwrap();
        assert_eq!(
            xattr_store.head("b", "x").await.unwrap().content_type,
            "image/tiff"
        );
    }

    #[test]
    fn refused_attributes_fall_back_to_sidecars() {
        for errno in [
            libc::EOPNOTSUPP,
            libc::E2BIG,
            libc::ENOSPC,
            libc::ERANGE,
            libc::EPERM,
            libc::EACCES,
        ] {
            assert!(
                attribute_refused(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        assert!(attribute_refused(&ErrorKind::Unsupported.into()));
        assert!(!attribute_refused(&io::Error::from_raw_os_error(libc::EIO)));
        assert!(!attribute_refused(&io::Error::from_raw_os_error(
            libc::EBADF
        )));
    }

    #[test]
    fn the_page_cache_says_whether_a_file_is_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 100_000]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        if let Err(e) = cached_pages(&file, 100_000) {
            assert!(
                matches!(
                    e.raw_os_error(),
                    Some(libc::ENOSYS | libc::EPERM | libc::EOPNOTSUPP)
                ),
                "{e}"
            );
            eprintln!("cachestat is not available here ({e}); skipped");
            assert!(!resident(&file, 100_000));
            return;
        }
        let fs = super::super::flush::filesystem(&file).unwrap();
        let asked = super::super::flush::local_disk_or_tmpfs(&fs);
        let fs = fs.f_type;
        // Just written, so in memory (where the filesystem is asked at all).
        assert_eq!(resident(&file, 100_000), asked);
        if !asked {
            return;
        }
        assert!(resident(&file, 0));
        // Pages past the end of the file are not in memory.
        assert!(!resident(&file, 200_000));
        if fs == libc::TMPFS_MAGIC {
            // tmpfs pages are the file: they cannot be dropped.
            return;
        }
        evict(&path);
        assert!(!resident(&file, 100_000));
        assert_eq!(std::fs::read(&path).unwrap().len(), 100_000);
        assert!(resident(&file, 100_000));
    }

    /// A store holding object `b/k` with its metadata in the attribute;
    /// `None` where the filesystem refuses attributes (the metadata then
    /// went to a sidecar).
    async fn one_object_with_an_attribute() -> Option<(tempfile::TempDir, LocalStore)> {
        let (dir, store) = store();
        store
            .put("b", "k", Bytes::from_static(b"x"), PutOptions::default())
            .await
            .unwrap();
        if !takes_attributes(dir.path()) {
            assert!(store.root().join(".imgfunc-meta/b/k").is_file());
            return None;
        }
        Some((dir, store))
    }

    #[tokio::test]
    async fn corrupt_attribute_is_an_io_error_naming_the_object() {
        let Some((_dir, store)) = one_object_with_an_attribute().await else {
            return;
        };
        for (damaged, says) in [
            (&b"{not json"[..], "key must be a string"),
            (
                b"\x01\x01\x00\x09cut",
                "metadata key: 9 bytes announced, 3 left",
            ),
            (b"\x02", "unknown encoding (first byte 0x02)"),
        ] {
            xattr::set(store.root().join("b/k"), META_XATTR, damaged).unwrap();
            let err = store.get("b", "k").await.unwrap_err();
            assert_eq!(err.code(), "io");
            assert!(err.to_string().contains("metadata attribute"), "{err}");
            assert!(err.to_string().contains("b/k"), "{err}");
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    #[tokio::test]
    async fn attributes_written_as_json_are_still_read() {
        let Some((_dir, store)) = one_object_with_an_attribute().await else {
            return;
        };
        let json = br#"{"type":"image/png","meta":{"imgfunc-chain":"b:r","a":"1"}}"#;
        xattr::set(store.root().join("b/k"), META_XATTR, json).unwrap();
        let meta = store.head("b", "k").await.unwrap();
        assert_eq!(meta.content_type, "image/png");
        assert_eq!(
            meta.user_metadata,
            BTreeMap::from([
                ("imgfunc-chain".to_string(), "b:r".to_string()),
                ("a".to_string(), "1".to_string()),
            ])
        );
    }

    /// On ext4, metadata over 64 bytes takes a 4 KiB block of its own; an
    /// output's (its chain and source) stays in the inode, so the object
    /// takes no more disk than its bytes do. (Elsewhere attributes do not
    /// show in the block count, and this holds trivially.)
    #[tokio::test]
    async fn an_output_s_metadata_takes_no_block_of_its_own() {
        use std::os::unix::fs::MetadataExt;
        let (dir, store) = store();
        let bytes = Bytes::from(vec![7u8; 10_000]);
        let meta = [
            ("imgfunc-chain", "photos:p1"),
            ("imgfunc-source", "photos/2026/11/IMG_20261127_0001.jpg"),
        ];
        store
            .put("b", "with.jpg", bytes.clone(), opts("image/jpeg", &meta))
            .await
            .unwrap();
        store
            .put("b", "without.jpg", bytes, opts("image/jpeg", &[]))
            .await
            .unwrap();
        if !takes_attributes(dir.path()) {
            return;
        }
        // Other attributes (a security label, an inherited ACL) share the
        // inode's room, and may leave too little for ours.
        let others = xattr::list(store.root().join("b/without.jpg"))
            .unwrap()
            .filter(|name| name != META_XATTR)
            .count();
        if others > 0 {
            eprintln!("the store's files carry other attributes; skipped");
            return;
        }
        let blocks = |key: &str| {
            std::fs::metadata(store.root().join("b").join(key))
                .unwrap()
                .blocks()
        };
        assert_eq!(blocks("with.jpg"), blocks("without.jpg"));
        assert_eq!(
            store.head("b", "with.jpg").await.unwrap().user_metadata["imgfunc-source"],
            "photos/2026/11/IMG_20261127_0001.jpg"
        );
    }

    #[tokio::test]
    async fn overwrite_replaces_bytes_and_metadata() {
        let (_dir, store) = store();
        store
            .put(
                "b",
                "k",
                Bytes::from_static(b"one"),
                opts("text/plain", &[("a", "1")]),
            )
            .await
            .unwrap();
        store
            .put("b", "k", Bytes::from_static(b"two!"), PutOptions::default())
            .await
            .unwrap();
        let object = store.get("b", "k").await.unwrap();
        assert_eq!(&object.bytes[..], b"two!");
        assert_eq!(object.meta.content_type, DEFAULT_CONTENT_TYPE);
        assert!(object.meta.user_metadata.is_empty());
    }

    #[tokio::test]
    async fn nested_keys_are_folders() {
        let (_dir, store) = sidecar_store();
        store
            .put(
                "b",
                "photos/2024/06/a.png",
                Bytes::from_static(b"png"),
                PutOptions::default(),
            )
            .await
            .unwrap();
        assert!(store.root().join("b/photos/2024/06/a.png").is_file());
        assert!(
            store
                .root()
                .join(".imgfunc-meta/b/photos/2024/06/a.png")
                .is_file()
        );
        let object = store.get("b", "photos/2024/06/a.png").await.unwrap();
        assert_eq!(&object.bytes[..], b"png");
    }

    #[tokio::test]
    async fn hostile_keys_are_refused() {
        let (dir, store) = store();
        for key in [
            "../x",
            "/etc/passwd",
            "a/../../b",
            "a\0b",
            "a//b",
            "a\\..\\b",
            "",
        ] {
            let err = store
                .put("b", key, Bytes::from_static(b"x"), PutOptions::default())
                .await
                .unwrap_err();
            assert_eq!(err.code(), "invalid_key", "{key:?}: {err}");
            assert!(err.to_string().contains(&format!("{key:?}")), "{err}");
            assert_eq!(store.get("b", key).await.unwrap_err().code(), "invalid_key");
            assert_eq!(
                store.head("b", key).await.unwrap_err().code(),
                "invalid_key"
            );
            assert_eq!(
                store.delete("b", key).await.unwrap_err().code(),
                "invalid_key"
            );
        }
        for bucket in ["..", ".imgfunc-meta", "a/b", ""] {
            let err = store
                .put(bucket, "k", Bytes::from_static(b"x"), PutOptions::default())
                .await
                .unwrap_err();
            assert_eq!(err.code(), "invalid_bucket", "{bucket:?}");
            assert_eq!(
                store.list(bucket, "").await.unwrap_err().code(),
                "invalid_bucket"
            );
        }
        // Nothing was written anywhere, inside the root or beside it.
        assert!(files_under(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn missing_objects_and_buckets() {
        let (_dir, store) = store();
        let err = store.get("nope", "k").await.unwrap_err();
        assert_eq!(err.code(), "no_such_bucket");
        assert!(err.is_not_found());
        assert_eq!(
            store.list("nope", "").await.unwrap_err().code(),
            "no_such_bucket"
        );
        assert_eq!(
            store.delete("nope", "k").await.unwrap_err().code(),
            "no_such_bucket"
        );

        store.create_bucket("b").await.unwrap();
        assert!(store.list("b", "").await.unwrap().is_empty());
        let err = store.get("b", "k").await.unwrap_err();
        assert!(
            matches!(&err, StoreError::NotFound { bucket, key } if bucket == "b" && key == "k")
        );
        assert_eq!(store.head("b", "k").await.unwrap_err().code(), "not_found");
        assert_eq!(
            store.head("b", "k/deeper").await.unwrap_err().code(),
            "not_found"
        );
        store.delete("b", "k").await.unwrap();
    }

    #[tokio::test]
    async fn a_long_listing_keeps_the_first_keys_in_order() {
        let (dir, store) = store();
        let folders = ["x", "a", "m"];
        let per_folder = LIST_LIMIT / 2;
        let mut all = Vec::new();
        for folder in folders {
            let path = dir.path().join("root/b").join(folder);
            std::fs::create_dir_all(&path).unwrap();
            // Written in reverse, so the folder's order is not the keys'.
            for i in (0..per_folder).rev() {
                std::fs::write(path.join(format!("{i:05}")), b"").unwrap();
                all.push(format!("{folder}/{i:05}"));
            }
        }
        all.sort();
        let listed: Vec<String> = store
            .list("b", "")
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(listed.len(), LIST_LIMIT);
        assert_eq!(listed, all[..LIST_LIMIT]);

        // The page says more follow; the next starts after its last key.
        let first = store.list_page("b", "", "").await.unwrap();
        assert!(first.truncated);
        let last = first.entries.last().unwrap().key.clone();
        let next = store.list_page("b", "", &last).await.unwrap();
        assert!(!next.truncated);
        let rest: Vec<String> = next.entries.into_iter().map(|e| e.key).collect();
        assert_eq!(rest, all[LIST_LIMIT..]);
        // Within a prefix too.
        let page = store.list_page("b", "m/", "m/03000").await.unwrap();
        assert!(!page.truncated);
        assert_eq!(page.entries.len(), per_folder - 3001);
        assert_eq!(page.entries[0].key, "m/03001");
    }

    #[tokio::test]
    async fn lists_sorted_with_prefix() {
        let (_dir, store) = store();
        for key in [
            "photos/b.jpg",
            "photos/a.jpg",
            "photos/sub/c.jpg",
            "photosx",
            "z.txt",
            "a",
        ] {
            store
                .put("b", key, Bytes::from(key.to_owned()), PutOptions::default())
                .await
                .unwrap();
        }
        let keys = |entries: Vec<ListEntry>| entries.into_iter().map(|e| e.key).collect::<Vec<_>>();

        let all = store.list("b", "").await.unwrap();
        assert_eq!(
            keys(all.clone()),
            [
                "a",
                "photos/a.jpg",
                "photos/b.jpg",
                "photos/sub/c.jpg",
                "photosx",
                "z.txt"
            ]
        );
        assert_eq!(all[1].size, "photos/a.jpg".len() as u64);
        assert!(all[1].last_modified.is_some());

        assert_eq!(
            keys(store.list("b", "photos/").await.unwrap()),
            ["photos/a.jpg", "photos/b.jpg", "photos/sub/c.jpg"]
        );
        assert_eq!(
            keys(store.list("b", "photos").await.unwrap()),
            [
                "photos/a.jpg",
                "photos/b.jpg",
                "photos/sub/c.jpg",
                "photosx"
            ]
        );
        assert_eq!(
            keys(store.list("b", "photos/s").await.unwrap()),
            ["photos/sub/c.jpg"]
        );
        assert!(store.list("b", "nothing").await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_writes_of_a_key_and_a_longer_one_report_the_clash() {
        // `eN` and `eN/x` cannot both be objects: one is stored and the
        // other refused as a clash (400), never an I/O error (500), however
        // the two interleave.
        let (_dir, store) = store();
        let store = Arc::new(store);
        store.create_bucket("b").await.unwrap();
        let put = |key: String| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .put("b", &key, Bytes::from_static(b"x"), opts("text/plain", &[]))
                    .await
            })
        };
        for n in 0..100 {
            let (short, long) = (put(format!("e{n}")), put(format!("e{n}/x")));
            let results = [short.await.unwrap(), long.await.unwrap()];
            let refused = results.iter().filter(|r| r.is_err()).count();
            assert_eq!(refused, 1, "pair {n}: {results:?}");
            for r in &results {
                if let Err(e) = r {
                    assert_eq!(e.code(), "invalid_key", "pair {n}: {e}");
                }
            }
        }
    }

    #[tokio::test]
    async fn a_new_root_and_bucket_are_flushed_into_their_parents() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("a/root"));
        store.create_root().await.unwrap();
        assert!(store.root().is_dir());
        // The temporary folder got `a`, and `a` got `root`.
        assert_eq!(store.flush.counts(), (2, 2));
        store.create_root().await.unwrap();
        store.create_bucket("b").await.unwrap();
        assert!(store.root().join("b").is_dir());
        assert_eq!(store.flush.counts(), (3, 3), "only the root got a folder");
    }

    #[test]
    fn folders_made_for_a_write_are_flushed_where_files_are_flushed_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let bucket = dir.path().join("b");
        std::fs::create_dir(&bucket).unwrap();
        assert_eq!(
            create_folders(&bucket.join("x/y")).unwrap(),
            [bucket.clone(), bucket.join("x")],
            "b got x, and x got y"
        );
        assert!(bucket.join("x/y").is_dir());
        assert!(create_folders(&bucket.join("x/y")).unwrap().is_empty());
        std::fs::write(bucket.join("f"), b"").unwrap();
        let err = create_folders(&bucket.join("f/z")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotADirectory, "a file is in the way");

        for unnamed in [true, false] {
            let flush = GroupFlush::file_by_file();
            let top = format!("n{unnamed}");
            let path = bucket.join(&top).join("p/k");
            write_staged(&path, b"v", None, None, unnamed, &flush, &mut Vec::new()).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), b"v");
            // The file, its folder p, then b and b/n.., which got the new
            // folders n.. and p.
            assert_eq!(flush.counts().1, 4, "unnamed {unnamed}");
            write_staged(
                &bucket.join(&top).join("p/k2"),
                b"w",
                None,
                None,
                unnamed,
                &flush,
                &mut Vec::new(),
            )
            .unwrap();
            assert_eq!(
                flush.counts().1,
                6,
                "no folder made: the file and its folder"
            );
        }
    }

    #[tokio::test]
    async fn names_are_flushed_before_a_write_or_delete_is_reported() {
        // Each write flushes its file, then (once linked) the name; a delete
        // flushes the folder it removed the name from. Counted in disk
        // flushes: a file on a filesystem that `syncfs` does not cover has
        // its own `fsync` and its folder another.
        let (dir, store) = store();
        if !takes_attributes(dir.path()) {
            eprintln!("no user attributes here: sidecar writes add their own flushes; skipped");
            return;
        }
        // Folders a write makes add flushes where files are flushed one by
        // one (see folders_made_for_a_write_...): here they are there.
        std::fs::create_dir_all(store.root().join("b/a")).unwrap();
        let put = |key: &'static str| {
            store.put("b", key, Bytes::from_static(b"x"), opts("text/plain", &[]))
        };
        put("a/k").await.unwrap();
        assert_eq!(store.flush.counts().1, 2, "the file, then its name");
        put("a/k").await.unwrap();
        assert_eq!(store.flush.counts().1, 4, "a replacement too");
        store.delete("b", "a/k").await.unwrap();
        assert_eq!(
            store.flush.counts().1,
            5,
            "the folder left after the delete"
        );
        assert!(store.root().join("b").is_dir());
        assert!(
            !store.root().join("b/a").exists(),
            "the empty folder was pruned"
        );
        store.delete("b", "a/k").await.unwrap();
        assert_eq!(
            store.flush.counts().1,
            5,
            "nothing removed, nothing flushed"
        );
    }

    #[tokio::test]
    async fn writes_and_deletes_do_not_go_through_a_linked_folder() {
        let (dir, store) = store();
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("y.txt"), b"kept").unwrap();
        std::fs::create_dir_all(store.root().join("b")).unwrap();
        std::os::unix::fs::symlink(&outside, store.root().join("b/shared")).unwrap();

        // Reading through the operator's link works.
        assert_eq!(
            &store.get("b", "shared/y.txt").await.unwrap().bytes[..],
            b"kept"
        );
        let err = store
            .put(
                "b",
                "shared/x.txt",
                Bytes::from_static(b"x"),
                opts("text/plain", &[]),
            )
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("\"shared\" is a link to a folder"),
            "{err}"
        );
        assert!(!outside.join("x.txt").exists());
        let err = store.delete("b", "shared/y.txt").await.unwrap_err();
        assert!(
            err.to_string().contains("\"shared\" is a link to a folder"),
            "{err}"
        );
        assert!(outside.join("y.txt").exists());
        // Objects beside the link are written as usual.
        store
            .put(
                "b",
                "own/x.txt",
                Bytes::from_static(b"x"),
                opts("text/plain", &[]),
            )
            .await
            .unwrap();
        store.delete("b", "own/x.txt").await.unwrap();
    }

    #[tokio::test]
    async fn pages_after_a_key_skip_the_folders_before_it() {
        let (_dir, store) = store();
        let keys = [
            "a/1", "a/2", "a.txt", "b/1", "b/2", "b/c/1", "b0", "c/1", "c-d/1",
        ];
        for key in keys {
            let put = store.put("b", key, Bytes::from_static(b"x"), opts("text/plain", &[]));
            put.await.unwrap();
        }
        let mut sorted = keys.to_vec();
        sorted.sort();
        for start_after in [
            "", "a", "a/", "a/2", "a.txt", "b/1", "b/c", "b/c/1", "b0", "c", "c-",
        ] {
            let page = store.list_page("b", "", start_after).await.unwrap();
            let listed: Vec<&str> = page.entries.iter().map(|e| e.key.as_str()).collect();
            let expected: Vec<&str> = sorted
                .iter()
                .copied()
                .filter(|k| *k > start_after)
                .collect();
            assert_eq!(listed, expected, "after {start_after:?}");
        }
    }

    #[tokio::test]
    async fn pages_of_any_size_list_what_a_sorted_filter_lists() {
        let (_dir, store) = store();
        let keys = [
            "a/1",
            "a/2",
            "a.txt",
            "a-1",
            "b/1",
            "b/2",
            "b/c/1",
            "b/c/2",
            "b0",
            "c/1",
            "c-d/1",
            "c-d/2",
            "d/e/f/g",
            "d/e/h",
            "photos/x.jpg",
            "photos.txt",
            "ph",
        ];
        for key in keys {
            let put = store.put("b", key, Bytes::from_static(b"x"), opts("text/plain", &[]));
            put.await.unwrap();
        }
        // Folders and files that hold no key.
        let bucket = store.root().join("b");
        std::fs::create_dir(bucket.join("b/empty")).unwrap();
        std::fs::create_dir_all(bucket.join("d/e/empty/deeper")).unwrap();
        std::os::unix::fs::symlink("a", bucket.join("link-to-folder")).unwrap();
        std::os::unix::fs::symlink("missing", bucket.join("broken-link")).unwrap();
        let reserved = bucket.join(format!("{RESERVED_SEGMENT_PREFIX}x"));
        std::fs::create_dir(&reserved).unwrap();
        std::fs::write(reserved.join("y"), b"x").unwrap();
        let mut sorted = keys.to_vec();
        sorted.sort();
        for limit in 1..=4 {
            for (prefix, start_after) in [
                ("", ""),
                ("a", ""),
                ("b/", ""),
                ("c", ""),
                ("ph", ""),
                ("photos/", ""),
                ("d/e/", ""),
                ("zzz", ""),
                ("", "a"),
                ("", "a/"),
                ("", "b/c"),
                ("", "b/c/1"),
                ("", "c-"),
                ("", "d/e/f"),
                ("", "zz"),
                ("b/", "b/1"),
            ] {
                let mut after = start_after.to_string();
                let mut listed = Vec::new();
                loop {
                    let rest: Vec<&str> = sorted
                        .iter()
                        .copied()
                        .filter(|k| k.starts_with(prefix) && *k > after.as_str())
                        .collect();
                    let page = list_walk("b", &bucket, prefix, &after, limit).unwrap();
                    let got: Vec<&str> = page.entries.iter().map(|e| e.key.as_str()).collect();
                    let case = format!("limit {limit}, {prefix:?} after {after:?}");
                    assert_eq!(got, rest[..rest.len().min(limit)], "{case}");
                    assert_eq!(page.truncated, rest.len() > limit, "{case}");
                    listed.extend(got.iter().map(|k| k.to_string()));
                    match page.entries.last() {
                        Some(last) if page.truncated => after = last.key.clone(),
                        _ => break,
                    }
                }
                let expected: Vec<&str> = sorted
                    .iter()
                    .copied()
                    .filter(|k| k.starts_with(prefix) && *k > start_after)
                    .collect();
                assert_eq!(
                    listed, expected,
                    "limit {limit}, {prefix:?} after {start_after:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_folder_of_more_entries_than_a_page_is_read_again_past_empty_ones() {
        let (_dir, store) = store();
        for key in ["f1", "f2", "g/f3", "g/f4"] {
            let put = store.put("b", key, Bytes::from_static(b"x"), opts("text/plain", &[]));
            put.await.unwrap();
        }
        // More empty folders than a page of two holds, all sorting before
        // the keys, in the bucket's folder and in a subfolder.
        let bucket = store.root().join("b");
        for n in 0..7 {
            std::fs::create_dir(bucket.join(format!("e{n}"))).unwrap();
            std::fs::create_dir(bucket.join(format!("g/e{n}"))).unwrap();
        }
        let first = list_walk("b", &bucket, "", "", 2).unwrap();
        let keys: Vec<&str> = first.entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["f1", "f2"]);
        assert!(first.truncated);
        let next = list_walk("b", &bucket, "", "f2", 2).unwrap();
        let keys: Vec<&str> = next.entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["g/f3", "g/f4"]);
        assert!(!next.truncated);
    }

    #[tokio::test]
    async fn listing_skips_a_folder_it_may_not_read() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, store) = store();
        let put = |key: &'static str| {
            store.put("b", key, Bytes::from_static(b"x"), opts("text/plain", &[]))
        };
        put("a.txt").await.unwrap();
        put("c/d.txt").await.unwrap();
        let closed = store.root().join("b/lost+found");
        std::fs::create_dir(&closed).unwrap();
        std::fs::write(closed.join("e.txt"), b"x").unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o000)).unwrap();
        let open = std::fs::Permissions::from_mode(0o755);
        std::fs::set_permissions(dir.path(), open.clone()).unwrap();
        // Listed by a thread whose file access is checked as another user's
        // (root reads every folder): `setfsuid` is per thread.
        let bucket_dir = store.root().join("b");
        let listed = std::thread::spawn(move || {
            // SAFETY: changes only this thread's filesystem user id.
            unsafe { libc::setfsuid(65534) };
            assert!(
                std::fs::read_dir(&closed).is_err(),
                "the folder is closed to this thread"
            );
            let listed = list_objects("b", &bucket_dir, "", "");
            (listed, closed)
        })
        .join()
        .unwrap();
        std::fs::set_permissions(&listed.1, open).unwrap();
        let keys: Vec<String> = listed
            .0
            .unwrap()
            .entries
            .into_iter()
            .map(|e| e.key)
            .collect();
        assert_eq!(keys, ["a.txt", "c/d.txt"]);
    }

    #[tokio::test]
    async fn a_fifo_in_a_bucket_folder_is_no_object_and_blocks_nothing() {
        let (_dir, store) = store();
        std::fs::create_dir_all(store.root().join("b")).unwrap();
        let fifo = std::ffi::CString::new(
            store
                .root()
                .join("b/pipe")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let got =
            tokio::time::timeout(std::time::Duration::from_secs(5), store.get("b", "pipe")).await;
        let err = got
            .expect("the read does not wait for a writer")
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
        assert!(store.list("b", "").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn put_leaves_no_temp_files() {
        let (_dir, store) = sidecar_store();
        for i in 0..5 {
            store
                .put(
                    "b",
                    "dir/k",
                    Bytes::from(vec![i; 1000]),
                    opts("a/b", &[("i", "x")]),
                )
                .await
                .unwrap();
        }
        assert_eq!(
            files_under(store.root()),
            [".imgfunc-meta/b/dir/k", "b/dir/k"]
        );
    }

    #[test]
    fn unnamed_and_named_staging_write_replace_and_leave_nothing_behind() {
        for unnamed in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            // The folder does not exist yet.
            let path = dir.path().join("b/deep/k.jpg");
            let flush = GroupFlush::new();
            let stored = write_staged(
                &path,
                b"first",
                Some(b"{\"a\":1}"),
                None,
                unnamed,
                &flush,
                &mut Vec::new(),
            )
            .unwrap()
            .attribute;
            assert_eq!(std::fs::read(&path).unwrap(), b"first", "unnamed {unnamed}");
            if stored {
                assert_eq!(
                    xattr::get(&path, META_XATTR).unwrap().unwrap(),
                    b"{\"a\":1}"
                );
            }
            // Replacing goes through a temporary name and a rename.
            write_staged(
                &path,
                b"second",
                Some(b"{\"a\":2}"),
                None,
                unnamed,
                &flush,
                &mut Vec::new(),
            )
            .unwrap();
            assert_eq!(
                std::fs::read(&path).unwrap(),
                b"second",
                "unnamed {unnamed}"
            );
            if stored {
                assert_eq!(
                    xattr::get(&path, META_XATTR).unwrap().unwrap(),
                    b"{\"a\":2}"
                );
            }
            let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["k.jpg"], "unnamed {unnamed}");
        }
    }

    #[test]
    fn a_refused_link_is_told_apart_from_a_failed_write() {
        // An unnamed file cannot be linked into another filesystem: the
        // kind of refusal after which a write starts over with a name.
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir_in("/dev/shm").unwrap();
        let staged = stage(dir.path(), true, &mut Vec::new()).unwrap();
        assert!(staged.name.is_none(), "this filesystem has unnamed files");
        let published = staged.publication(&other.path().join("k")).run();
        let err = staged.published(published).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EXDEV), "{err}");
        assert!(link_refused(&err));
        // What a named write would meet too is not a refusal.
        for errno in [libc::ENOSPC, libc::EIO, libc::EDQUOT, libc::EROFS] {
            assert!(!link_refused(&io::Error::from_raw_os_error(errno)));
        }
    }

    /// Sets or clears (`+i`, `-i`) the immutable flag of `path`; false
    /// where `chattr` is missing or the filesystem has no such flag.
    fn chattr(flag: &str, path: &Path) -> bool {
        std::process::Command::new("chattr")
            .arg(flag)
            .arg(path)
            .status()
            .is_ok_and(|s| s.success())
    }

    #[tokio::test]
    async fn a_refused_rename_keeps_unnamed_files_on() {
        // Replacing an immutable object fails at the rename, after the
        // unnamed file was linked under a temporary name: that says
        // nothing about linking, which later writes go on using.
        let (_dir, store) = store();
        let put = || store.put("b", "k", Bytes::from_static(b"x"), opts("text/plain", &[]));
        put().await.unwrap();
        let path = store.root().join("b/k");
        if !chattr("+i", &path) {
            eprintln!("chattr +i is not available here; skipped");
            return;
        }
        let refused = put().await;
        chattr("-i", &path);
        let err = refused.unwrap_err();
        assert!(err.to_string().contains("Operation not permitted"), "{err}");
        assert!(
            UNNAMED_FILES.load(Ordering::Relaxed),
            "unnamed files are still in use"
        );
        put().await.unwrap();
    }

    #[tokio::test]
    async fn errors_name_files_from_the_root_not_where_the_store_lives() {
        let (dir, store) = store();
        // A file where the bucket's folder should be: the write fails.
        std::fs::create_dir_all(store.root()).unwrap();
        std::fs::write(store.root().join("b"), b"not a folder").unwrap();
        let err = store
            .put("b", "k", Bytes::from_static(b"x"), PutOptions::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot create temporary file in b: "), "{err}");
        assert!(!err.contains(&*dir.path().to_string_lossy()), "{err}");
    }

    #[test]
    fn temp_names_are_reserved() {
        assert!(TMP_PREFIX.starts_with(RESERVED_SEGMENT_PREFIX));
        assert!(validate_local_key(&format!("dir/{TMP_PREFIX}1-1")).is_err());
    }

    #[tokio::test]
    async fn temp_files_are_hidden_from_listing() {
        let (_dir, store) = store();
        store
            .put("b", "k", Bytes::from_static(b"x"), PutOptions::default())
            .await
            .unwrap();
        std::fs::write(store.root().join("b/.imgfunc-tmp-1-1"), b"partial").unwrap();
        let entries = store.list("b", "").await.unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].key, "k");
    }

    #[tokio::test]
    async fn delete_removes_object_sidecar_and_empty_folders() {
        let (_dir, store) = sidecar_store();
        for key in ["x/y/z.jpg", "x/keep.jpg"] {
            store
                .put("b", key, Bytes::from_static(b"x"), PutOptions::default())
                .await
                .unwrap();
        }
        store.delete("b", "x/y/z.jpg").await.unwrap();
        assert_eq!(
            store.get("b", "x/y/z.jpg").await.unwrap_err().code(),
            "not_found"
        );
        assert_eq!(
            files_under(store.root()),
            [".imgfunc-meta/b/x/keep.jpg", "b/x/keep.jpg"]
        );
        assert!(!store.root().join("b/x/y").exists());
        assert!(!store.root().join(".imgfunc-meta/b/x/y").exists());

        store.delete("b", "x/keep.jpg").await.unwrap();
        assert!(files_under(store.root()).is_empty());
        // The bucket itself stays.
        assert!(store.root().join("b").is_dir());
        assert!(store.list("b", "").await.unwrap().is_empty());
        // Deleting again, or a folder's name, is fine.
        store.delete("b", "x/keep.jpg").await.unwrap();
    }

    #[tokio::test]
    async fn a_key_cannot_be_object_and_folder() {
        let (_dir, store) = store();
        store
            .put("b", "a", Bytes::from_static(b"x"), PutOptions::default())
            .await
            .unwrap();
        let err = store
            .put("b", "a/b", Bytes::from_static(b"x"), PutOptions::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), "invalid_key");
        assert!(
            err.to_string().contains("\"a\" is already an object"),
            "{err}"
        );

        store
            .put("b", "c/d", Bytes::from_static(b"x"), PutOptions::default())
            .await
            .unwrap();
        let err = store
            .put("b", "c", Bytes::from_static(b"x"), PutOptions::default())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("objects under \"c/\" exist"),
            "{err}"
        );
        assert_eq!(store.get("b", "c").await.unwrap_err().code(), "not_found");

        // An empty folder (left by a write that failed after making it)
        // holds no object and makes way for one.
        std::fs::create_dir_all(store.root().join("b/e")).unwrap();
        store
            .put("b", "e", Bytes::from_static(b"e"), PutOptions::default())
            .await
            .unwrap();
        assert_eq!(&store.get("b", "e").await.unwrap().bytes[..], b"e");
        // A link to an empty folder is not removed through.
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), store.root().join("b/l")).unwrap();
        let err = store
            .put("b", "l", Bytes::from_static(b"l"), PutOptions::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), "invalid_key");
        assert!(err.to_string().contains("is a link to a folder"), "{err}");
        assert!(elsewhere.path().is_dir());
    }

    #[tokio::test]
    async fn files_without_sidecar_get_a_guessed_type() {
        let (_dir, store) = store();
        std::fs::create_dir_all(store.root().join("b/in")).unwrap();
        std::fs::write(store.root().join("b/in/photo.JPG"), b"jpeg").unwrap();
        std::fs::write(store.root().join("b/blob"), b"?").unwrap();
        let meta = store.head("b", "in/photo.JPG").await.unwrap();
        assert_eq!(meta.content_type, "image/jpeg");
        assert_eq!(meta.size, 4);
        assert!(meta.user_metadata.is_empty());
        let meta = store.head("b", "blob").await.unwrap();
        assert_eq!(meta.content_type, DEFAULT_CONTENT_TYPE);
    }

    #[tokio::test]
    async fn stale_sidecars_do_not_block_puts() {
        let (_dir, store) = sidecar_store();
        // As if a delete of "a" was interrupted after removing the object.
        std::fs::create_dir_all(store.root().join(".imgfunc-meta/b")).unwrap();
        std::fs::write(store.root().join(".imgfunc-meta/b/a"), b"{}").unwrap();
        store
            .put(
                "b",
                "a/b",
                Bytes::from_static(b"x"),
                opts("text/plain", &[]),
            )
            .await
            .unwrap();
        assert_eq!(
            store.head("b", "a/b").await.unwrap().content_type,
            "text/plain"
        );
    }

    #[tokio::test]
    async fn corrupt_sidecar_is_an_io_error_naming_it() {
        let (_dir, store) = sidecar_store();
        store
            .put("b", "k", Bytes::from_static(b"x"), PutOptions::default())
            .await
            .unwrap();
        std::fs::write(store.root().join(".imgfunc-meta/b/k"), b"not json").unwrap();
        let err = store.get("b", "k").await.unwrap_err();
        assert_eq!(err.code(), "io");
        assert!(err.to_string().contains(".imgfunc-meta"), "{err}");
    }

    #[tokio::test]
    async fn a_put_whose_sidecar_cannot_be_written_leaves_the_old_object() {
        let (_dir, store) = sidecar_store();
        for key in ["k", "new/k"] {
            store
                .put("b", key, Bytes::from_static(b"old"), opts("a/old", &[]))
                .await
                .unwrap();
        }
        // A file where the sidecars' folder goes: no sidecar can be
        // written (as on a full disk, where the object's own bytes still
        // fit).
        let sidecars = store.root().join(".imgfunc-meta");
        std::fs::remove_dir_all(&sidecars).unwrap();
        std::fs::write(&sidecars, b"").unwrap();
        for key in ["k", "new/k", "other"] {
            let err = store
                .put("b", key, Bytes::from_static(b"new"), opts("a/new", &[]))
                .await
                .unwrap_err();
            assert_eq!(err.code(), "io", "{err}");
            assert!(err.to_string().contains(".imgfunc-meta"), "{err}");
        }
        // The objects are as they were, and none was added.
        assert_eq!(std::fs::read(store.root().join("b/k")).unwrap(), b"old");
        assert_eq!(std::fs::read(store.root().join("b/new/k")).unwrap(), b"old");
        assert!(!store.root().join("b/other").exists());
        assert_eq!(files_under(&store.root().join("b")), ["k", "new/k"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_does_not_hold_up_a_put_of_the_same_key() {
        let (_dir, store) = store();
        let store = Arc::new(store);
        let first = Bytes::from(vec![1u8; 300_000]);
        let second = Bytes::from(vec![2u8; 1000]);
        store
            .put("b", "k", first.clone(), opts("a/b", &[]))
            .await
            .unwrap();
        let (writer, runtime) = (Arc::clone(&store), tokio::runtime::Handle::current());
        let replacement = second.clone();
        let (_, read) = store
            .open_with(
                "b",
                "k",
                Box::new(move |_, body| {
                    // Opened, not yet read: a put of the same key goes
                    // through, and this reader still reads what it opened.
                    let put = writer.put("b", "k", replacement, opts("a/b", &[]));
                    runtime
                        .block_on(tokio::time::timeout(
                            std::time::Duration::from_secs(10),
                            put,
                        ))
                        .map_err(|_| io::Error::other("the put waited for the reader"))?
                        .map_err(io::Error::other)?;
                    let Body::File(mut file) = body else {
                        return Err(io::Error::other("the local store hands over its file"));
                    };
                    let mut bytes = Vec::new();
                    file.read_to_end(&mut bytes)?;
                    Ok(Some(Kept::Bytes(Bytes::from(bytes))))
                }),
            )
            .await
            .unwrap();
        let Some(Kept::Bytes(read)) = read else {
            panic!("the bytes read were kept");
        };
        assert_eq!(read, first);
        assert_eq!(store.get("b", "k").await.unwrap().bytes, second);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_puts_and_gets_see_whole_versions() {
        for (dir, store) in [store(), sidecar_store()] {
            let files = match store.place {
                MetadataPlace::Xattr if takes_attributes(dir.path()) => 1,
                _ => 2,
            };
            concurrent_puts_and_gets(store, files).await;
        }
    }

    async fn concurrent_puts_and_gets(store: LocalStore, files: usize) {
        let store = Arc::new(store);
        let mut tasks = Vec::new();
        for i in 0..8u8 {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                let body = Bytes::from(vec![i; 64 * 1024]);
                let tag = i.to_string();
                store
                    .put("b", "shared", body, opts("x/y", &[("tag", &tag)]))
                    .await
                    .unwrap();
                let object = store.get("b", "shared").await.unwrap();
                let tag = &object.meta.user_metadata["tag"];
                let first = object.bytes[0];
                assert!(object.bytes.iter().all(|&b| b == first));
                assert_eq!(tag, &first.to_string());
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(files_under(store.root()).len(), files);
    }
}
