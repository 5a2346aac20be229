//! The S3 store: any S3-compatible endpoint (QingStor, MinIO, Ceph RGW, AWS)
//! through `aws-sdk-s3`.
//!
//! Error mapping: `NoSuchBucket` becomes [`StoreError::NoSuchBucket`];
//! `NoSuchKey`, `NotFound` and any other 404 on an object becomes
//! [`StoreError::NotFound`] (a HEAD response has no body, so a HEAD on a
//! missing bucket is reported as a missing object too). Everything else is
//! [`StoreError::Backend`] with the SDK's full error chain in the message.

use super::validate::normalize_put_options;
use super::{
    Body, BoxFuture, DEFAULT_CONTENT_TYPE, LIST_LIMIT, ListEntry, ListPage, Object, ObjectMeta,
    ObjectReader, ObjectStore, PutOptions, StoreError, validate_bucket, validate_key,
};
use aws_sdk_s3::Client;
use aws_sdk_s3::config::Region;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, DateTime};
use bytes::Bytes;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};

/// The region used when the environment names none; S3-compatible servers
/// mostly ignore it, but request signing needs one.
const DEFAULT_REGION: &str = "us-east-1";

/// An [`ObjectStore`] backed by an S3-compatible service.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    endpoint: String,
    list_page_size: Option<i32>,
    /// How long reading a body may wait for its next chunk.
    body_timeout: Duration,
    /// The timeouts the AWS configuration set, which a PUT's longer ones
    /// (for its body) do not replace.
    configured_timeouts: Option<TimeoutConfig>,
}

/// How long a request may wait for the next byte of its answer (the
/// response's start included, and each chunk of a body read) before it
/// fails as `backend`.
pub const S3_READ_TIMEOUT: Duration = Duration::from_secs(30);

fn body_stalled(timeout: Duration) -> String {
    format!("no byte of the body came for {timeout:?}")
}

/// The slowest upload a PUT is given time for: 256 KiB/s, on top of the
/// read timeout. The SDK's read timeout runs until the answer's first byte,
/// so it covers sending the body; a 256 MiB object would not fit in 30 s.
const SLOWEST_UPLOAD_BYTES_PER_SEC: u64 = 256 << 10;

/// Timeouts for a PUT of `len` bytes: the read and attempt timeouts grown by
/// the time the body takes at [`SLOWEST_UPLOAD_BYTES_PER_SEC`].
fn put_timeouts(len: usize) -> TimeoutConfig {
    let upload = Duration::from_secs(len as u64 / SLOWEST_UPLOAD_BYTES_PER_SEC);
    TimeoutConfig::builder()
        .read_timeout(S3_READ_TIMEOUT + upload)
        .operation_attempt_timeout(Duration::from_secs(120) + upload)
        .operation_timeout(Duration::from_secs(300) + upload * 3)
        .build()
}

/// What a 404 without an error code means for the operation at hand.
#[derive(Clone, Copy)]
enum Missing {
    Object,
    Bucket,
}

impl S3Store {
    /// A store over a ready client. `endpoint_description` is only shown by
    /// [`ObjectStore::describe`] (`s3:<endpoint_description>`).
    pub fn new(client: Client, endpoint_description: String) -> Self {
        S3Store {
            client,
            endpoint: endpoint_description,
            list_page_size: None,
            body_timeout: S3_READ_TIMEOUT,
            configured_timeouts: None,
        }
    }

    /// Waits at most `timeout` for each chunk of a body instead of
    /// [`S3_READ_TIMEOUT`]; mostly useful to test a stalled server.
    pub fn with_body_timeout(mut self, timeout: Duration) -> Self {
        self.body_timeout = timeout;
        self
    }

    /// A store for `endpoint` (`http(s)://host[:port]`; empty for AWS's own
    /// endpoints) with region and credentials from aws-config's default chain:
    /// `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, profiles
    /// and so on. The region defaults to `us-east-1`. MinIO and most
    /// self-hosted servers need `force_path_style`.
    pub async fn from_env(endpoint: &str, force_path_style: bool) -> Result<S3Store, StoreError> {
        check_endpoint(endpoint)?;
        let region = aws_config::meta::region::RegionProviderChain::default_provider()
            .or_else(Region::new(DEFAULT_REGION));
        let sdk_config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(region)
            .load()
            .await;
        S3Store::from_sdk_config(&sdk_config, endpoint, force_path_style)
    }

    /// Like [`S3Store::from_env`], from an already loaded [`aws_config::SdkConfig`].
    pub fn from_sdk_config(
        sdk_config: &aws_config::SdkConfig,
        endpoint: &str,
        force_path_style: bool,
    ) -> Result<S3Store, StoreError> {
        check_endpoint(endpoint)?;
        // Timeouts the loaded configuration leaves unset (it sets only a
        // connect timeout): without them a server that accepts a request
        // and never answers holds the invocation, its image slot and, once
        // every slot is held, the whole host.
        let ours = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(S3_READ_TIMEOUT)
            .operation_attempt_timeout(Duration::from_secs(120))
            .operation_timeout(Duration::from_secs(300));
        let timeouts = match sdk_config.timeout_config() {
            Some(set) => set.to_builder().take_unset_from(ours).build(),
            None => ours.build(),
        };
        let mut builder = aws_sdk_s3::config::Builder::from(sdk_config)
            .force_path_style(force_path_style)
            .timeout_config(timeouts);
        // The SDK's own check of a body that stops coming fails it after a
        // few seconds without a byte; a body gets our read timeout instead,
        // as every chunk does (unless the configuration sets its own).
        if sdk_config.stalled_stream_protection().is_none() {
            builder = builder.stalled_stream_protection(
                aws_sdk_s3::config::StalledStreamProtectionConfig::enabled()
                    .grace_period(S3_READ_TIMEOUT)
                    .build(),
            );
        }
        if sdk_config.region().is_none() {
            builder = builder.region(Region::new(DEFAULT_REGION));
        }
        let description = if endpoint.is_empty() {
            "aws".to_owned()
        } else {
            builder = builder.endpoint_url(endpoint);
            endpoint.to_owned()
        };
        Ok(S3Store {
            configured_timeouts: sdk_config.timeout_config().cloned(),
            ..S3Store::new(Client::from_conf(builder.build()), description)
        })
    }

    /// Asks for at most `n` keys per `ListObjectsV2` page instead of the
    /// server's default (1000); mostly useful to test pagination.
    pub fn with_list_page_size(mut self, n: i32) -> Self {
        self.list_page_size = Some(n);
        self
    }

    /// The client this store sends its requests through.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Creates a bucket; one that already exists and is ours is fine.
    pub async fn create_bucket(&self, bucket: &str) -> Result<(), StoreError> {
        check_bucket(bucket)?;
        match self.client.create_bucket().bucket(bucket).send().await {
            Ok(_) => Ok(()),
            Err(err) if err.code() == Some("BucketAlreadyOwnedByYou") => Ok(()),
            Err(err) => Err(map_error("create_bucket", bucket, "", Missing::Bucket, err)),
        }
    }

    /// Sends a GET: the object's metadata (its size from `Content-Length`)
    /// and its body, not yet read.
    async fn get_object(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<(ObjectMeta, ByteStream), StoreError> {
        check_target(bucket, key)?;
        let resp = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| map_error("get_object", bucket, key, Missing::Object, e))?;
        let meta = object_meta(
            resp.content_type(),
            non_negative(resp.content_length()),
            resp.metadata(),
            resp.last_modified(),
            resp.e_tag(),
        );
        Ok((meta, resp.body))
    }
}

fn check_endpoint(endpoint: &str) -> Result<(), StoreError> {
    if endpoint.is_empty() || endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        return Ok(());
    }
    Err(StoreError::Backend {
        op: "configure",
        target: endpoint.to_owned(),
        message: "the endpoint must start with http:// or https://".into(),
        transient: false,
    })
}

fn check_target(bucket: &str, key: &str) -> Result<(), StoreError> {
    check_bucket(bucket)?;
    validate_key(key)
}

/// The shared bucket rules and S3's own on top: at least 3 characters, no
/// `_`, no `..`, a letter or digit at each end, not shaped like an IP
/// address. A name S3 would refuse is a 400 naming the rule, not a 502
/// from the server.
fn check_bucket(bucket: &str) -> Result<(), StoreError> {
    validate_bucket(bucket)?;
    let reason = if bucket.len() < 3 {
        "S3 bucket names are at least 3 characters"
    } else if bucket.contains('_') {
        "S3 bucket names cannot contain '_'"
    } else if bucket.contains("..") {
        "S3 bucket names cannot contain '..'"
    } else if !bucket.ends_with(|c: char| c.is_ascii_alphanumeric()) {
        "S3 bucket names end with a letter or digit"
    } else if bucket.parse::<std::net::Ipv4Addr>().is_ok() {
        "S3 bucket names cannot look like an IP address"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidBucket {
        bucket: bucket.to_owned(),
        reason: reason.into(),
    })
}

/// Turns an SDK error into a [`StoreError`] naming the operation and target.
fn map_error<E>(
    op: &'static str,
    bucket: &str,
    key: &str,
    missing: Missing,
    err: SdkError<E>,
) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    match (err.code(), status, missing) {
        (Some("NoSuchBucket"), _, _) => StoreError::no_such_bucket(bucket),
        (Some("NoSuchKey" | "NotFound"), _, _) | (None, Some(404), Missing::Object) => {
            StoreError::not_found(bucket, key)
        }
        (None, Some(404), Missing::Bucket) => StoreError::no_such_bucket(bucket),
        _ => StoreError::Backend {
            op,
            target: if key.is_empty() {
                bucket.to_owned()
            } else {
                format!("{bucket}/{key}")
            },
            message: backend_message(&err, status),
            transient: transient(&err, status),
        },
    }
}

/// Whether a failed request may succeed if sent again: the server's own
/// failure or throttling, S3's `RequestTimeout` (400), a timeout, or a
/// connection that failed. Not a request the client could not make (no
/// credentials, an endpoint that does not resolve to a URL), which fails
/// the same way every time.
fn transient<E>(err: &SdkError<E>, status: Option<u16>) -> bool
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    use aws_credential_types::provider::error::CredentialsError;
    match status {
        Some(s) => s >= 500 || s == 408 || s == 429 || err.code() == Some("RequestTimeout"),
        None => match err {
            SdkError::TimeoutError(_) => true,
            // A request that could not be sent may go next time (a
            // connection refused or cut short, a credential provider or
            // its cache that timed out or failed), unless it is one the
            // client could never make: credentials not there or configured
            // wrong, a request it cannot build.
            SdkError::DispatchFailure(failure) => match cause::<CredentialsError>(err) {
                Some(
                    CredentialsError::CredentialsNotLoaded(_)
                    | CredentialsError::InvalidConfiguration(_),
                ) => false,
                Some(_) => true,
                None => !failure.is_user(),
            },
            _ => false,
        },
    }
}

/// The first error of type `T` in `err`'s chain of causes.
fn cause<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        next = e.source();
    }
    None
}

/// The server's error code and message, with the HTTP status, where it
/// gave them; else the chain of causes (a timeout, a refused connection).
/// Never the raw response, whose headers and body the SDK's own text
/// carries.
fn backend_message<E>(err: &SdkError<E>, status: Option<u16>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let Some(code) = err.code() else {
        // A HEAD answer has no body, so its errors carry only a status.
        if let (SdkError::ServiceError(_), Some(status)) = (err, status) {
            let reason = hyper::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("");
            return format!("HTTP {status} {reason}").trim_end().to_owned();
        }
        return causes(err);
    };
    let mut message = code.to_owned();
    if let Some(text) = err.message() {
        message.push_str(": ");
        message.push_str(text);
    }
    if let Some(status) = status {
        message.push_str(&format!(" (HTTP {status})"));
    }
    message
}

/// `err` and its sources, each shown once: what the SDK's
/// `DisplayErrorContext` says without its debug dump of the whole error
/// (connectors, URIs, the raw response), which made a refused connection
/// a 2 KB message.
fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let shown = cause.to_string();
        if !shown.is_empty() && !text.contains(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        source = cause.source();
    }
    text
}

fn to_system_time(t: Option<&DateTime>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(*t).ok())
}

/// Builds [`ObjectMeta`] from the fields GET and HEAD responses share.
fn object_meta(
    content_type: Option<&str>,
    size: u64,
    metadata: Option<&HashMap<String, String>>,
    last_modified: Option<&DateTime>,
    etag: Option<&str>,
) -> ObjectMeta {
    ObjectMeta {
        content_type: content_type
            .filter(|ct| !ct.is_empty())
            .unwrap_or(DEFAULT_CONTENT_TYPE)
            .to_owned(),
        size,
        user_metadata: metadata
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                    .collect()
            })
            .unwrap_or_default(),
        last_modified: to_system_time(last_modified),
        etag: normalize_etag(etag),
    }
}

/// An ETag as HTTP writes it: some servers leave out the quotes.
fn normalize_etag(etag: Option<&str>) -> Option<String> {
    etag.filter(|e| !e.is_empty()).map(|e| {
        if e.starts_with('"') || e.starts_with("W/") {
            e.to_owned()
        } else {
            format!("\"{e}\"")
        }
    })
}

fn non_negative(n: Option<i64>) -> u64 {
    n.and_then(|n| u64::try_from(n).ok()).unwrap_or(0)
}

impl ObjectStore for S3Store {
    fn get(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<Object, StoreError>> {
        let (bucket, key) = (bucket.to_owned(), key.to_owned());
        Box::pin(async move {
            let (mut meta, mut body) = self.get_object(&bucket, &key).await?;
            let failed = |message: String| StoreError::Backend {
                op: "get_object",
                target: format!("{bucket}/{key}"),
                message,
                transient: true,
            };
            let mut bytes = Vec::new();
            // Each chunk within the read timeout: the SDK's own timeouts end
            // with the response's headers.
            while let Some(chunk) = tokio::time::timeout(self.body_timeout, body.next())
                .await
                .map_err(|_| failed(body_stalled(self.body_timeout)))?
            {
                let chunk = chunk
                    .map_err(|e| failed(format!("reading the body failed: {}", causes(&e))))?;
                bytes.extend_from_slice(&chunk);
            }
            let bytes = Bytes::from(bytes);
            meta.size = bytes.len() as u64;
            Ok(Object { bytes, meta })
        })
    }

    /// The body streams: a reader that stops early (a thumbnail of a
    /// progressive JPEG needs its first scans only) drops the rest of the
    /// response unread.
    fn open(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<ObjectReader, StoreError>> {
        let (bucket, key) = (bucket.to_owned(), key.to_owned());
        Box::pin(async move {
            let (meta, body) = self.get_object(&bucket, &key).await?;
            let reader = StreamReader {
                stream: body,
                chunk: Bytes::new(),
                runtime: tokio::runtime::Handle::current(),
                timeout: self.body_timeout,
            };
            Ok(ObjectReader {
                meta,
                body: Body::Read(Box::new(reader)),
            })
        })
    }

    fn head(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<ObjectMeta, StoreError>> {
        let (bucket, key) = (bucket.to_owned(), key.to_owned());
        Box::pin(async move {
            check_target(&bucket, &key)?;
            let resp = self
                .client
                .head_object()
                .bucket(&bucket)
                .key(&key)
                .send()
                .await
                .map_err(|e| map_error("head_object", &bucket, &key, Missing::Object, e))?;
            Ok(object_meta(
                resp.content_type(),
                non_negative(resp.content_length()),
                resp.metadata(),
                resp.last_modified(),
                resp.e_tag(),
            ))
        })
    }

    fn put(
        &self,
        bucket: &str,
        key: &str,
        bytes: Bytes,
        opts: PutOptions,
    ) -> BoxFuture<'_, Result<Option<String>, StoreError>> {
        let (bucket, key) = (bucket.to_owned(), key.to_owned());
        Box::pin(async move {
            check_target(&bucket, &key)?;
            let opts = normalize_put_options(opts)?;
            let metadata: HashMap<String, String> = opts.user_metadata.into_iter().collect();
            let timeouts = match &self.configured_timeouts {
                Some(set) => set
                    .to_builder()
                    .take_unset_from(put_timeouts(bytes.len()).to_builder())
                    .build(),
                None => put_timeouts(bytes.len()),
            };
            let resp = self
                .client
                .put_object()
                .bucket(&bucket)
                .key(&key)
                .content_type(opts.content_type)
                .set_metadata((!metadata.is_empty()).then_some(metadata))
                .body(ByteStream::from(bytes))
                .customize()
                .config_override(aws_sdk_s3::config::Builder::new().timeout_config(timeouts))
                .send()
                .await
                .map_err(|e| map_error("put_object", &bucket, &key, Missing::Bucket, e))?;
            // Quoted as a read gives it, for a client's next `If-Match`.
            Ok(normalize_etag(resp.e_tag()))
        })
    }

    fn delete(&self, bucket: &str, key: &str) -> BoxFuture<'_, Result<(), StoreError>> {
        let (bucket, key) = (bucket.to_owned(), key.to_owned());
        Box::pin(async move {
            check_target(&bucket, &key)?;
            match self
                .client
                .delete_object()
                .bucket(&bucket)
                .key(&key)
                .send()
                .await
            {
                Ok(_) => Ok(()),
                // Some servers answer a missing key with NoSuchKey instead of 204.
                Err(err) if err.code() == Some("NoSuchKey") => Ok(()),
                Err(err) => Err(map_error(
                    "delete_object",
                    &bucket,
                    &key,
                    Missing::Bucket,
                    err,
                )),
            }
        })
    }

    fn list_page(
        &self,
        bucket: &str,
        prefix: &str,
        start_after: &str,
    ) -> BoxFuture<'_, Result<ListPage, StoreError>> {
        let (bucket, prefix) = (bucket.to_owned(), prefix.to_owned());
        let start_after = start_after.to_owned();
        Box::pin(async move {
            check_bucket(&bucket)?;
            let mut request = self.client.list_objects_v2().bucket(&bucket);
            if !prefix.is_empty() {
                request = request.prefix(&prefix);
            }
            if !start_after.is_empty() {
                request = request.start_after(&start_after);
            }
            if let Some(n) = self.list_page_size {
                request = request.max_keys(n);
            }
            let mut pages = request.into_paginator().send();
            let mut entries = Vec::new();
            let mut truncated = false;
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| {
                    let target_key = format!("{prefix}*");
                    map_error("list_objects_v2", &bucket, &target_key, Missing::Bucket, e)
                })?;
                for object in page.contents() {
                    let Some(key) = object.key() else { continue };
                    entries.push(ListEntry {
                        key: key.to_owned(),
                        size: non_negative(object.size()),
                        last_modified: to_system_time(object.last_modified()),
                    });
                }
                if entries.len() >= LIST_LIMIT {
                    truncated = entries.len() > LIST_LIMIT || page.is_truncated() == Some(true);
                    break;
                }
            }
            entries.sort_unstable_by(|a, b| a.key.cmp(&b.key));
            entries.truncate(LIST_LIMIT);
            Ok(ListPage { entries, truncated })
        })
    }

    fn describe(&self) -> String {
        format!("s3:{}", self.endpoint)
    }

    fn bucket_check(&self) -> super::BucketCheck {
        check_bucket
    }
}

/// A blocking reader over a response body, for use off the runtime's
/// worker threads (tokio's blocking pool): each read waits for the next
/// chunk on the runtime.
struct StreamReader {
    stream: ByteStream,
    /// The part of the last chunk not yet read.
    chunk: Bytes,
    runtime: tokio::runtime::Handle,
    /// How long to wait for the next chunk.
    timeout: Duration,
}

impl std::io::Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            let next = self
                .runtime
                .block_on(tokio::time::timeout(self.timeout, self.stream.next()))
                .map_err(|_| {
                    std::io::Error::other(super::BackendRead(body_stalled(self.timeout)))
                })?;
            match next {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => {
                    return Err(std::io::Error::other(super::BackendRead(format!(
                        "the body broke off: {}",
                        causes(&e)
                    ))));
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_quoted_as_http_writes_them() {
        assert_eq!(normalize_etag(Some("abc")).as_deref(), Some("\"abc\""));
        assert_eq!(normalize_etag(Some("\"abc\"")).as_deref(), Some("\"abc\""));
        assert_eq!(
            normalize_etag(Some("W/\"abc\"")).as_deref(),
            Some("W/\"abc\"")
        );
        assert_eq!(normalize_etag(Some("")), None);
        assert_eq!(normalize_etag(None), None);
    }

    #[test]
    fn a_large_put_gets_time_to_send_its_body() {
        let small = put_timeouts(10 << 10);
        assert_eq!(small.read_timeout(), Some(S3_READ_TIMEOUT));
        // 256 MiB at 256 KiB/s: 1024 s more to send it.
        let large = put_timeouts(256 << 20);
        assert_eq!(
            large.read_timeout(),
            Some(S3_READ_TIMEOUT + Duration::from_secs(1024))
        );
        assert!(large.operation_attempt_timeout() > large.read_timeout());
        assert!(large.operation_timeout() > large.operation_attempt_timeout());
    }

    #[test]
    fn endpoint_must_be_http() {
        let config = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build();
        let err = S3Store::from_sdk_config(&config, "127.0.0.1:9000", true).unwrap_err();
        assert_eq!(err.code(), "backend");
        assert!(err.to_string().contains("127.0.0.1:9000"), "{err}");
        assert!(err.to_string().contains("http://"), "{err}");

        let store = S3Store::from_sdk_config(&config, "http://127.0.0.1:9000", true).unwrap();
        assert_eq!(store.describe(), "s3:http://127.0.0.1:9000");
        assert_eq!(
            store.client().config().region().map(|r| r.as_ref()),
            Some(DEFAULT_REGION)
        );
        let store = S3Store::from_sdk_config(&config, "", false).unwrap();
        assert_eq!(store.describe(), "s3:aws");
    }

    #[tokio::test]
    async fn invalid_targets_fail_before_any_request() {
        let config = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build();
        // Nothing listens on port 9; a request would fail with `backend`.
        let store = S3Store::from_sdk_config(&config, "http://127.0.0.1:9", true).unwrap();
        assert_eq!(
            store.get("bkt", "").await.unwrap_err().code(),
            "invalid_key"
        );
        assert_eq!(
            store.head("B", "k").await.unwrap_err().code(),
            "invalid_bucket"
        );
        assert_eq!(
            store.list("", "").await.unwrap_err().code(),
            "invalid_bucket"
        );
        let mut opts = PutOptions::default();
        opts.user_metadata.insert("bad name".into(), "v".into());
        let err = store.put("bkt", "k", Bytes::new(), opts).await.unwrap_err();
        assert_eq!(err.code(), "invalid_metadata");
        // Names the shared rules allow but S3 refuses: a 400 naming S3's
        // rule, not a 502 from the server.
        for (bucket, why) in [
            ("ab", "at least 3"),
            ("my_bucket", "'_'"),
            ("a..b", "'..'"),
            ("photos-", "end with a letter or digit"),
            ("192.168.1.10", "IP address"),
        ] {
            let err = store.get(bucket, "k").await.unwrap_err();
            assert_eq!(err.code(), "invalid_bucket", "{bucket}");
            assert!(err.to_string().contains(why), "{bucket}: {err}");
            assert_eq!(
                store.list(bucket, "").await.unwrap_err().code(),
                "invalid_bucket"
            );
        }
        assert!(check_bucket("photos.2024-a").is_ok());
    }
}
