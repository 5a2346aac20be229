//! The object stores against each other: the same checks run on a
//! `LocalStore` over a temporary folder and on an `S3Store` talking to an
//! in-process S3 server over TCP.

use crate::common;

use bytes::Bytes;
use common::s3::{S3Server, s3_client, start_s3};
use imgfunc::store::{
    Body, DEFAULT_CONTENT_TYPE, Kept, ListEntry, LocalStore, ObjectStore, PutOptions, S3Store,
    StoreError,
};
use std::collections::BTreeMap;

fn keys(entries: &[ListEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.key.as_str()).collect()
}

fn put_options(content_type: &str, meta: &[(&str, &str)]) -> PutOptions {
    PutOptions {
        content_type: content_type.to_owned(),
        user_metadata: meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// Up to `limit` bytes of an opened body, read on the blocking pool.
async fn read_body(body: Body, limit: usize) -> Vec<u8> {
    use std::io::Read;
    match body {
        Body::Bytes(bytes) => bytes[..limit.min(bytes.len())].to_vec(),
        body => tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            body.into_reader()
                .take(limit as u64)
                .read_to_end(&mut out)
                .unwrap();
            out
        })
        .await
        .unwrap(),
    }
}

/// Up to `limit` bytes of `body`, read in place: for `open_with` readers,
/// which run where blocking is allowed.
fn read_blocking(body: Body, limit: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    match body {
        Body::Bytes(bytes) => Ok(bytes[..limit.min(bytes.len())].to_vec()),
        body => {
            let mut out = Vec::new();
            body.into_reader()
                .take(limit as u64)
                .read_to_end(&mut out)?;
            Ok(out)
        }
    }
}

/// An `open_with` reader that keeps every byte.
fn read_all() -> imgfunc::store::ReadBody {
    Box::new(|_, body| Ok(Some(Kept::Bytes(read_blocking(body, usize::MAX)?.into()))))
}

/// The error of an `open_with` of `bkt/photo.jpg` that reads it whole,
/// which must be the server's (`backend`).
async fn backend_failure_of_a_read(store: &S3Store) -> imgfunc::store::StoreError {
    let err = store
        .open_with("bkt", "photo.jpg", read_all())
        .await
        .err()
        .expect("the read fails");
    assert_eq!(err.code(), "backend", "{err:?}");
    err
}

/// The bytes an `open_with` reader of these tests kept.
fn kept_bytes(kept: Option<Kept>) -> Bytes {
    match kept {
        Some(Kept::Bytes(bytes)) => bytes,
        _ => panic!("the readers here keep bytes"),
    }
}

/// The behaviour every store must share. `bucket` exists and is empty;
/// `missing_bucket` does not exist.
async fn conformance(store: &dyn ObjectStore, bucket: &str, missing_bucket: &str) {
    let body = Bytes::from((0..=255u8).cycle().take(10_000).collect::<Vec<u8>>());

    // Round trip: bytes, content type, user metadata (names come back
    // lowercase), and the ETag the write gave.
    let written = store
        .put(
            bucket,
            "photos/a.jpg",
            body.clone(),
            put_options(
                "image/jpeg",
                &[("Rule-Id", "thumbs"), ("source", "in/a.jpg")],
            ),
        )
        .await
        .unwrap();
    let object = store.get(bucket, "photos/a.jpg").await.unwrap();
    assert!(written.is_some(), "a write gives its tag");
    assert_eq!(object.meta.etag, written);
    assert_eq!(object.bytes, body);
    assert_eq!(object.meta.content_type, "image/jpeg");
    assert_eq!(object.meta.size, body.len() as u64);
    let expected: BTreeMap<String, String> = [("rule-id", "thumbs"), ("source", "in/a.jpg")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(object.meta.user_metadata, expected);
    assert!(object.meta.last_modified.is_some());

    // Opening gives the same metadata and bytes. A streamed body is read
    // off the runtime, as the image cloudfunc reads it, and may be dropped
    // part-way, after which the store keeps serving.
    let opened = store.open(bucket, "photos/a.jpg").await.unwrap();
    assert_eq!(opened.meta.size, body.len() as u64);
    assert_eq!(opened.meta.content_type, "image/jpeg");
    assert_eq!(opened.meta.user_metadata, expected);
    assert_eq!(read_body(opened.body, usize::MAX).await, body);
    let big = Bytes::from((0..=250u8).cycle().take(4 << 20).collect::<Vec<u8>>());
    store
        .put(bucket, "big.bin", big.clone(), put_options("", &[]))
        .await
        .unwrap();
    for _ in 0..3 {
        let opened = store.open(bucket, "big.bin").await.unwrap();
        assert_eq!(opened.meta.size, big.len() as u64);
        assert_eq!(read_body(opened.body, 100).await, big[..100]);
    }
    assert_eq!(store.get(bucket, "big.bin").await.unwrap().bytes, big);

    // Opening with a reader: it sees the metadata and the body (read where
    // blocking is allowed), and its bytes come back; it may stop early or
    // leave the body unread; its errors name the object.
    let (meta, bytes) = store
        .open_with(
            bucket,
            "photos/a.jpg",
            Box::new(|meta, body| {
                assert_eq!(meta.content_type, "image/jpeg");
                Ok(Some(Kept::Bytes(read_blocking(body, usize::MAX)?.into())))
            }),
        )
        .await
        .unwrap();
    assert_eq!(meta.user_metadata, expected);
    assert_eq!(kept_bytes(bytes), body);
    for _ in 0..3 {
        let (meta, bytes) = store
            .open_with(
                bucket,
                "big.bin",
                Box::new(|_, body| Ok(Some(Kept::Bytes(read_blocking(body, 100)?.into())))),
            )
            .await
            .unwrap();
        assert_eq!(meta.size, big.len() as u64);
        assert_eq!(kept_bytes(bytes), big[..100]);
    }
    let (meta, bytes) = store
        .open_with(bucket, "big.bin", Box::new(|_, _| Ok(None)))
        .await
        .unwrap();
    assert_eq!(meta.size, big.len() as u64);
    assert!(bytes.is_none());
    let err = store
        .open_with(
            bucket,
            "big.bin",
            Box::new(|_, _| Err(std::io::Error::other("not a JPEG"))),
        )
        .await
        .err()
        .unwrap();
    assert!(matches!(&err, StoreError::Io { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("big.bin") && message.contains("not a JPEG"),
        "{message}"
    );
    let err = store
        .open_with(bucket, "photos/missing.jpg", Box::new(|_, _| Ok(None)))
        .await
        .err()
        .unwrap();
    assert!(matches!(&err, StoreError::NotFound { .. }), "{err}");
    store.delete(bucket, "big.bin").await.unwrap();
    let err = store
        .open(bucket, "photos/missing.jpg")
        .await
        .err()
        .unwrap();
    assert!(matches!(&err, StoreError::NotFound { .. }), "{err}");

    let meta = store.head(bucket, "photos/a.jpg").await.unwrap();
    assert_eq!(meta.content_type, "image/jpeg");
    assert_eq!(meta.size, body.len() as u64);
    assert_eq!(meta.user_metadata, expected);
    assert!(meta.last_modified.is_some());

    // Overwriting replaces metadata too; no content type means the default.
    store
        .put(
            bucket,
            "photos/a.jpg",
            Bytes::from_static(b"v2"),
            PutOptions::default(),
        )
        .await
        .unwrap();
    let object = store.get(bucket, "photos/a.jpg").await.unwrap();
    assert_eq!(&object.bytes[..], b"v2");
    assert_eq!(object.meta.content_type, DEFAULT_CONTENT_TYPE);
    assert!(object.meta.user_metadata.is_empty());

    // Listing: recursive, sorted, filtered by a plain string prefix.
    for key in ["photos/b.png", "photos/sub/c.webp", "photosx", "other.txt"] {
        let bytes = Bytes::from(key.as_bytes().to_vec());
        store
            .put(
                bucket,
                key,
                bytes,
                PutOptions::with_content_type("text/plain"),
            )
            .await
            .unwrap();
    }
    let all = store.list(bucket, "").await.unwrap();
    assert_eq!(
        keys(&all),
        [
            "other.txt",
            "photos/a.jpg",
            "photos/b.png",
            "photos/sub/c.webp",
            "photosx"
        ]
    );
    for entry in &all {
        let expected = if entry.key == "photos/a.jpg" {
            2
        } else {
            entry.key.len()
        };
        assert_eq!(entry.size, expected as u64, "{}", entry.key);
        assert!(entry.last_modified.is_some(), "{}", entry.key);
    }
    let photos = store.list(bucket, "photos/").await.unwrap();
    assert_eq!(
        keys(&photos),
        ["photos/a.jpg", "photos/b.png", "photos/sub/c.webp"]
    );
    let photos = store.list(bucket, "photos").await.unwrap();
    assert_eq!(photos.len(), 4);
    assert!(store.list(bucket, "none/").await.unwrap().is_empty());
    // A page from after a key.
    let page = store
        .list_page(bucket, "photos/", "photos/a.jpg")
        .await
        .unwrap();
    assert!(!page.truncated);
    assert_eq!(keys(&page.entries), ["photos/b.png", "photos/sub/c.webp"]);

    // Missing keys.
    let err = store.get(bucket, "photos/missing.jpg").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound { bucket: b, key } if b == bucket && key == "photos/missing.jpg"),
        "{err:?}"
    );
    assert!(err.is_not_found());
    assert_eq!(err.code(), "not_found");
    assert!(err.to_string().contains("photos/missing.jpg"), "{err}");
    let err = store.head(bucket, "photos/missing.jpg").await.unwrap_err();
    assert_eq!(err.code(), "not_found", "{err:?}");

    // Delete, then it is gone; deleting again is fine.
    store.delete(bucket, "photos/b.png").await.unwrap();
    assert_eq!(
        store.get(bucket, "photos/b.png").await.unwrap_err().code(),
        "not_found"
    );
    store.delete(bucket, "photos/b.png").await.unwrap();
    store.delete(bucket, "never/existed").await.unwrap();
    assert_eq!(
        keys(&store.list(bucket, "photos/").await.unwrap()),
        ["photos/a.jpg", "photos/sub/c.webp"]
    );

    // Missing buckets. A GET cannot always tell which one is missing (s3s-fs
    // says NoSuchKey), so only "not there" is common ground.
    let err = store.get(missing_bucket, "k").await.unwrap_err();
    assert!(err.is_not_found(), "{err:?}");
    let err = store.list(missing_bucket, "").await.unwrap_err();
    assert_eq!(err.code(), "no_such_bucket", "{err:?}");
    assert!(err.to_string().contains(missing_bucket), "{err}");
    let err = store.delete(missing_bucket, "k").await.unwrap_err();
    assert_eq!(err.code(), "no_such_bucket", "{err:?}");

    // Refused before any I/O, the same way everywhere.
    let err = store.get(bucket, "").await.unwrap_err();
    assert_eq!(err.code(), "invalid_key");
    let err = store
        .put(bucket, "a\0b", Bytes::new(), PutOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_key");
    let err = store.list("Not_A_Bucket", "").await.unwrap_err();
    assert_eq!(err.code(), "invalid_bucket");
    let err = store
        .put(
            bucket,
            "k",
            Bytes::new(),
            put_options("text/plain", &[("bad name", "x")]),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_metadata");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_store_conformance() {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::new(dir.path().to_path_buf());
    store.create_bucket("photos").await.unwrap();
    conformance(&store, "photos", "missing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_conformance() {
    let s3 = start_s3().await;
    s3.create_bucket("photos").await;
    let store = s3.store();
    assert_eq!(store.describe(), format!("s3:{}", s3.endpoint));
    conformance(&store, "photos", "missing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_work_behind_arc_dyn() {
    let s3 = start_s3().await;
    s3.create_bucket("bkt").await;
    let dir = tempfile::tempdir().unwrap();
    let stores: Vec<std::sync::Arc<dyn ObjectStore>> = vec![
        std::sync::Arc::new(LocalStore::new(dir.path().to_path_buf())),
        std::sync::Arc::new(s3.store()),
    ];
    for store in stores {
        let task = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .put("bkt", "k", Bytes::from_static(b"x"), PutOptions::default())
                    .await
            }
        });
        task.await.unwrap().unwrap();
        assert_eq!(&store.get("bkt", "k").await.unwrap().bytes[..], b"x");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_list_follows_pagination() {
    let s3 = start_s3().await;
    s3.create_bucket("many").await;
    let store = s3.store().with_list_page_size(2);
    let mut expected = Vec::new();
    for i in 0..7 {
        let key = format!("p/{i:02}");
        store
            .put("many", &key, Bytes::from(vec![0; i]), PutOptions::default())
            .await
            .unwrap();
        expected.push(key);
    }
    store
        .put("many", "q", Bytes::new(), PutOptions::default())
        .await
        .unwrap();
    let entries = store.list("many", "p/").await.unwrap();
    assert_eq!(keys(&entries), expected);
    assert_eq!(entries[6].size, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_objects_written_by_other_clients_are_read() {
    let s3 = start_s3().await;
    s3.create_bucket("bkt").await;
    s3.client()
        .put_object()
        .bucket("bkt")
        .key("in/photo.jpg")
        .content_type("image/jpeg")
        .metadata("Camera", "x100")
        .body(Bytes::from_static(b"jpeg").into())
        .send()
        .await
        .unwrap();
    let object = s3.store().get("bkt", "in/photo.jpg").await.unwrap();
    assert_eq!(&object.bytes[..], b"jpeg");
    assert_eq!(object.meta.content_type, "image/jpeg");
    assert_eq!(object.meta.user_metadata["camera"], "x100");
    // And the server holds the bytes as written.
    let on_disk = std::fs::read(s3.root.join("bkt/in/photo.jpg")).unwrap();
    assert_eq!(on_disk, b"jpeg");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_wrong_credentials_are_a_backend_error() {
    let s3: S3Server = start_s3().await;
    s3.create_bucket("bkt").await;
    let client = s3_client(&s3.endpoint, &s3.access_key, "wrong-secret");
    let store = S3Store::new(client, s3.endpoint.clone());
    let err = store.get("bkt", "k").await.unwrap_err();
    assert_eq!(err.code(), "backend", "{err:?}");
    let message = err.to_string();
    assert!(message.starts_with("s3 get_object bkt/k:"), "{message}");
    assert!(message.contains("SignatureDoesNotMatch"), "{message}");
    assert!(message.contains("(HTTP 403)"), "{message}");
    // A refusal, not worth trying again.
    assert!(matches!(
        err,
        StoreError::Backend {
            transient: false,
            ..
        }
    ));
    // The code and the server's message, not the raw response the SDK
    // would print (headers, request ids, the XML body).
    assert!(message.len() < 300, "{message}");
    assert!(!message.contains("x-amz-request-id"), "{message}");

    // A HEAD's answer has no body, so no code: its status says what failed.
    let message = store.head("bkt", "k").await.unwrap_err().to_string();
    assert_eq!(message, "s3 head_object bkt/k: HTTP 403 Forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_named_in_a_short_message() {
    // Nothing listens on port 9.
    let store = S3Store::new(
        s3_client("http://127.0.0.1:9", "a", "b"),
        "http://127.0.0.1:9".into(),
    );
    for err in [
        store.get("bkt", "k").await.unwrap_err(),
        store.head("bkt", "k").await.unwrap_err(),
    ] {
        assert_eq!(err.code(), "backend", "{err:?}");
        // Worth trying again later.
        assert!(matches!(
            err,
            StoreError::Backend {
                transient: true,
                ..
            }
        ));
        let message = err.to_string();
        assert!(message.contains("Connection refused"), "{message}");
        // The causes' own words, not the SDK's debug dump of its connector.
        assert!(message.len() < 300, "{message}");
        assert!(!message.contains("Some("), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_is_a_backend_error_in_bounded_time() {
    // Unset timeouts get ours: reads, attempts and whole operations.
    let config = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .build();
    let store = S3Store::from_sdk_config(&config, "http://127.0.0.1:9", true).unwrap();
    let timeouts = store.client().config().timeout_config().cloned().unwrap();
    assert_eq!(
        timeouts.read_timeout(),
        Some(imgfunc::store::S3_READ_TIMEOUT)
    );
    assert!(timeouts.operation_attempt_timeout().is_some());
    assert!(timeouts.operation_timeout().is_some());
    // A body that stops coming gets the same time as a response's headers.
    let stalled = store.client().config().stalled_stream_protection().unwrap();
    assert_eq!(stalled.grace_period(), imgfunc::store::S3_READ_TIMEOUT);

    // A server that takes the request and never answers, with the read
    // timeout set short: the GET fails as `backend`, naming the timeout.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            held.push(stream);
        }
    });
    let config = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::SharedCredentialsProvider::new(
            aws_sdk_s3::config::Credentials::new("a", "b", None, None, "test"),
        ))
        .timeout_config(
            aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                .read_timeout(std::time::Duration::from_millis(500))
                .build(),
        )
        .build();
    let store = S3Store::from_sdk_config(&config, &endpoint, true).unwrap();
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(std::time::Duration::from_secs(20), store.get("bkt", "k"))
        .await
        .expect("the GET ends by itself")
        .unwrap_err();
    assert_eq!(err.code(), "backend", "{err:?}");
    assert!(err.to_string().contains("timeout"), "{err}");
    assert!(matches!(
        err,
        StoreError::Backend {
            transient: true,
            ..
        }
    ));
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    // A PUT gets longer timeouts for its body, but not over the ones the
    // configuration set.
    let started = std::time::Instant::now();
    let put = store.put("bkt", "k", Bytes::from_static(b"x"), PutOptions::default());
    let err = tokio::time::timeout(std::time::Duration::from_secs(20), put)
        .await
        .expect("the PUT ends by itself")
        .unwrap_err();
    assert!(err.to_string().contains("timeout"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    silent.abort();
}

/// A GET through a store whose credentials come from `provider`: its
/// error, and whether it may pass.
async fn get_with_credentials(
    endpoint: &str,
    provider: impl aws_sdk_s3::config::ProvideCredentials + 'static,
) -> (StoreError, bool) {
    let config = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::SharedCredentialsProvider::new(provider))
        .build();
    let store = S3Store::from_sdk_config(&config, endpoint, true).unwrap();
    let err = store.get("bkt", "k").await.unwrap_err();
    assert_eq!(err.code(), "backend", "{err:?}");
    let transient = matches!(
        err,
        StoreError::Backend {
            transient: true,
            ..
        }
    );
    (err, transient)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_client_cannot_make_is_not_worth_trying_again() {
    // Credentials from a profile that no configuration file has: the
    // request is never sent, and sending it again later would fail the same
    // way.
    let s3 = start_s3().await;
    let provider = aws_config::profile::ProfileFileCredentialsProvider::builder()
        .profile_name("imgfunc-test-no-such-profile")
        .build();
    let (err, transient) = get_with_credentials(&s3.endpoint, provider).await;
    assert!(!transient, "{err:?}");
    assert!(err.to_string().contains("credential"), "{err}");

    // A provider that did not answer in time (instance metadata, STS) may
    // next time.
    #[derive(Debug)]
    struct TimedOut;
    impl aws_sdk_s3::config::ProvideCredentials for TimedOut {
        fn provide_credentials<'a>(
            &'a self,
        ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            aws_credential_types::provider::future::ProvideCredentials::ready(Err(
                aws_credential_types::provider::error::CredentialsError::provider_timed_out(
                    std::time::Duration::from_secs(1),
                ),
            ))
        }
    }
    let (err, transient) = get_with_credentials(&s3.endpoint, TimedOut).await;
    assert!(transient, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_creates_buckets() {
    let s3 = start_s3().await;
    let store = s3.store();
    store.create_bucket("fresh").await.unwrap();
    assert!(store.list("fresh", "").await.unwrap().is_empty());
    store
        .put(
            "fresh",
            "k",
            Bytes::from_static(b"x"),
            PutOptions::default(),
        )
        .await
        .unwrap();
    // Only BucketAlreadyOwnedByYou counts as success; s3s-fs answers
    // BucketAlreadyExists, which on AWS means someone else's bucket.
    let err = store.create_bucket("fresh").await.unwrap_err();
    assert_eq!(err.code(), "backend", "{err:?}");
    assert!(err.to_string().contains("fresh"), "{err}");
    assert_eq!(
        store.create_bucket("Bad").await.unwrap_err().code(),
        "invalid_bucket"
    );
}

/// Counts the bytes a reader hands out.
struct Counted<R> {
    inner: R,
    read: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_thumbnail_sources_are_read_only_up_to_their_dc_scan() {
    let s3 = start_s3().await;
    s3.create_bucket("photos").await;
    let store = s3.store();
    // A progressive 1280x960 JPEG at quality 90: its first scan carries DC
    // to within half a level (quantiser 3, one bit left) and ends 15 KB
    // into the 137 KB file.
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/images/wood-progressive-1280.jpg"
    );
    let jpeg = std::fs::read(path).unwrap();
    store
        .put(
            "photos",
            "wood.jpg",
            Bytes::from(jpeg.clone()),
            put_options("image/jpeg", &[]),
        )
        .await
        .unwrap();
    let opened = store.open("photos", "wood.jpg").await.unwrap();
    assert_eq!(opened.meta.size, jpeg.len() as u64);
    let Body::Read(reader) = opened.body else {
        panic!("S3 bodies stream");
    };
    let read = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut counted = Counted {
        inner: reader,
        read: read.clone(),
    };
    let action = imgfunc::action::Action::parse("resize:w_150").unwrap();
    let size = jpeg.len() as u64;
    let cut = tokio::task::spawn_blocking(move || {
        imgfunc::imaging::read_source(&mut counted, size, &action, &Default::default()).unwrap()
    })
    .await
    .unwrap();
    let read = read.load(std::sync::atomic::Ordering::Relaxed);
    // The 64 KB head, and no more: the DC scan ends inside it.
    assert_eq!(read, 64 << 10, "read {read} of {}", jpeg.len());
    assert!(cut.len() < read, "kept {} of {read}", cut.len());
    assert_eq!(cut[..cut.len() - 2], jpeg[..cut.len() - 2]);
    assert_eq!(cut[cut.len() - 2..], [0xff, 0xd9]);
}

/// A server on 127.0.0.1 that answers every request with the headers and
/// the first ten bytes of a 1000-byte body, then hangs up, or with `hold`
/// keeps the connection open and sends nothing more. Its endpoint and task.
async fn start_of_a_body(hold: bool) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).await;
            let _ = stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n\
                      Content-Length: 1000\r\n\r\nonly ten b",
                )
                .await;
            if hold {
                held.push(stream);
            }
        }
    });
    (endpoint, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_breaks_off_is_the_servers_failure_not_a_local_file() {
    // Answers every request with the start of a 1000-byte body, then hangs up.
    let (endpoint, server) = start_of_a_body(false).await;
    let store = S3Store::new(s3_client(&endpoint, "a", "b"), endpoint.clone());
    let message = backend_failure_of_a_read(&store).await.to_string();
    assert!(
        message.starts_with("s3 get_object bkt/photo.jpg:"),
        "{message}"
    );
    assert!(message.contains("broke off"), "{message}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stops_coming_is_a_backend_error_in_bounded_time() {
    // Sends the headers and the start of a 1000-byte body, then nothing,
    // holding the connection open.
    let (endpoint, server) = start_of_a_body(true).await;
    let store = S3Store::new(s3_client(&endpoint, "a", "b"), endpoint.clone())
        .with_body_timeout(std::time::Duration::from_millis(300));
    let started = std::time::Instant::now();
    // Read whole, and streamed as invocations read sources.
    let err = store.get("bkt", "photo.jpg").await.unwrap_err();
    assert_eq!(err.code(), "backend", "{err:?}");
    assert!(
        err.to_string().contains("no byte of the body came"),
        "{err}"
    );
    let err = backend_failure_of_a_read(&store).await;
    assert!(
        err.to_string().contains("no byte of the body came"),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    server.abort();
}
