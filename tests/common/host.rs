//! A function host on 127.0.0.1:0 for end-to-end tests, the HTTP receiver
//! that its `notify_url`s point at, and polling helpers.
//!
//! ```ignore
//! let dir = tempfile::tempdir().unwrap();
//! let receiver = Receiver::start(Behaviour::Accept).await;
//! let host = TestHost::local(test_config(dir.path())).await;
//! host.set_rules("photos", &json!({"notifications": [...]})).await;
//! let payloads = receiver.wait_for(1).await;
//! host.stop().await;
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use imgfunc::host::{Host, HostConfig};
use imgfunc::store::{LocalStore, ObjectStore};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long any wait in these tests may take before it counts as a failure.
pub const WAIT: Duration = Duration::from_secs(20);

/// How long to keep watching for something that must *not* happen.
pub const QUIET: Duration = Duration::from_millis(400);

/// A configuration for tests: any free port, two workers, and notify
/// timings short enough that retries and dead letters take well under a
/// second. The dead-letter file stays where [`HostConfig::new`] puts it.
pub fn test_config(data_dir: &Path) -> HostConfig {
    let mut config = HostConfig::new(data_dir.to_path_buf());
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.workers = 2;
    config.queue_bound = 64;
    config.notify.attempts = 3;
    config.notify.timeout = Duration::from_secs(2);
    config.notify.delay = Duration::from_millis(50);
    config.drain_timeout = Duration::from_secs(15);
    config
}

/// A running host. Stop it with [`TestHost::stop`] to check that it shut
/// down cleanly; dropping it only aborts it.
pub struct TestHost {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    pub data_dir: PathBuf,
    pub http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestHost {
    /// A host over `store`, serving in the background.
    pub async fn start(config: HostConfig, store: Arc<dyn ObjectStore>) -> TestHost {
        let data_dir = config.data_dir.clone();
        let host = Host::bind(config, store).await.expect("bind the host");
        let addr = host.local_addr().expect("the host's address");
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(host.run(async move {
            let _ = rx.await;
        }));
        TestHost {
            addr,
            base: format!("http://{addr}"),
            data_dir,
            http: reqwest::Client::new(),
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    /// A host over the embedded local store rooted at the data directory.
    pub async fn local(config: HostConfig) -> TestHost {
        let store = Arc::new(LocalStore::new(config.data_dir.clone()));
        TestHost::start(config, store).await
    }

    /// Completes the shutdown future and waits for `run` to return, which
    /// it does only after the queued work and its notifications finished.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let handle = self.handle.take().expect("the host task");
        tokio::time::timeout(WAIT, handle)
            .await
            .expect("the host stops within the wait")
            .expect("the host task does not panic")
            .expect("run returns Ok");
    }

    /// The URL of `path`, which starts with `/`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The URL of an object, the key percent-encoded segment by segment.
    pub fn object_url(&self, bucket: &str, key: &str) -> String {
        self.url(&format!("/{bucket}/{}", encode_key(key)))
    }

    /// `PUT /{bucket}/{key}` through the object API.
    pub async fn put_object(
        &self,
        bucket: &str,
        key: &str,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> reqwest::Response {
        self.http
            .put(self.object_url(bucket, key))
            .header("content-type", content_type)
            .body(bytes)
            .send()
            .await
            .expect("PUT object")
    }

    /// The bytes of `bucket/key`, read through the object API.
    pub async fn object_bytes(&self, bucket: &str, key: &str) -> bytes::Bytes {
        let response = self
            .http
            .get(self.object_url(bucket, key))
            .send()
            .await
            .expect("GET object");
        assert_eq!(response.status(), 200, "GET {bucket}/{key}");
        response.bytes().await.expect("the object's bytes")
    }

    /// PUTs `bytes` as a JPEG under each of `keys` in `bucket`, each answered 201.
    pub async fn put_jpegs(
        &self,
        bucket: &str,
        keys: impl IntoIterator<Item = String>,
        bytes: &[u8],
    ) {
        for key in keys {
            let put = self
                .put_object(bucket, &key, bytes.to_vec(), "image/jpeg")
                .await;
            assert_eq!(put.status(), 201, "PUT {bucket}/{key}");
        }
    }

    /// `PUT /{bucket}?notification`.
    pub async fn set_rules(&self, bucket: &str, body: &Value) -> reqwest::Response {
        self.http
            .put(self.url(&format!("/{bucket}?notification")))
            .json(body)
            .send()
            .await
            .expect("PUT ?notification")
    }

    /// `GET /{bucket}?notification`, which must answer 200.
    pub async fn get_rules(&self, bucket: &str) -> Value {
        let response = self
            .http
            .get(self.url(&format!("/{bucket}?notification")))
            .send()
            .await
            .expect("GET ?notification");
        assert_eq!(response.status(), 200, "GET /{bucket}?notification");
        response.json().await.expect("rules JSON")
    }

    /// `POST /v1/events` with a JSON body.
    pub async fn post_events(&self, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url("/v1/events"))
            .json(body)
            .send()
            .await
            .expect("POST /v1/events")
    }

    /// The keys of `GET /{bucket}`, sorted as the host lists them.
    pub async fn list_keys(&self, bucket: &str) -> Vec<String> {
        let response = self
            .http
            .get(self.url(&format!("/{bucket}")))
            .send()
            .await
            .expect("GET bucket");
        assert_eq!(response.status(), 200, "GET /{bucket}");
        let body: Value = response.json().await.expect("listing JSON");
        body["keys"]
            .as_array()
            .expect("keys in the listing")
            .iter()
            .map(|k| k["key"].as_str().expect("key").to_string())
            .collect()
    }

    /// `GET /readyz`'s `queue_depth`.
    pub async fn queue_depth(&self) -> u64 {
        let body: Value = self
            .http
            .get(self.url("/readyz"))
            .send()
            .await
            .expect("GET /readyz")
            .json()
            .await
            .expect("readyz JSON");
        body["queue_depth"].as_u64().expect("queue_depth")
    }

    /// Where the host keeps payloads it could not deliver.
    pub fn dead_letter_path(&self) -> PathBuf {
        self.data_dir.join(".imgfunc").join("dead-letter.jsonl")
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

/// Everything but unreserved characters, so `a b.jpg` becomes `a%20b.jpg`.
const KEY_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A key for a URL path: each `/`-separated segment percent-encoded.
pub fn encode_key(key: &str) -> String {
    key.split('/')
        .map(|segment| utf8_percent_encode(segment, KEY_SEGMENT).to_string())
        .collect::<Vec<_>>()
        .join("/")
}

/// What the receiver does with each POST.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// Answers 200 and records the body.
    Accept,
    /// Answers 500 to the first `n` requests, then behaves as `Accept`.
    FailFirst(usize),
    /// Reads the request and never answers.
    Hang,
}

struct ReceiverState {
    behaviour: Behaviour,
    hits: AtomicUsize,
    bodies: Mutex<Vec<Value>>,
}

/// A real HTTP server that stands in for a rule's `notify_url`: every POST
/// to `/hook` counts as a hit; the bodies it accepted are kept in order.
pub struct Receiver {
    /// `http://127.0.0.1:<port>/hook`.
    pub url: String,
    state: Arc<ReceiverState>,
    handle: JoinHandle<()>,
}

impl Receiver {
    pub async fn start(behaviour: Behaviour) -> Receiver {
        let state = Arc::new(ReceiverState {
            behaviour,
            hits: AtomicUsize::new(0),
            bodies: Mutex::new(Vec::new()),
        });
        let app = axum::Router::new()
            .route("/hook", post(receive))
            .with_state(state.clone());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("the receiver's address");
        let handle = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: format!("http://{addr}/hook"),
            state,
            handle,
        }
    }

    /// Requests received, answered or not.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// The bodies answered with 200, in the order they arrived.
    pub fn bodies(&self) -> Vec<Value> {
        self.state.bodies.lock().expect("receiver lock").clone()
    }

    /// Waits until at least `n` bodies were accepted and returns them all.
    pub async fn wait_for(&self, n: usize) -> Vec<Value> {
        eventually(&format!("{n} notification(s) at {}", self.url), || {
            let bodies = self.bodies();
            std::future::ready((bodies.len() >= n).then_some(bodies))
        })
        .await
    }

    /// Waits until the payloads of every invocation id in `ids` arrived;
    /// returns them in the order of `ids`.
    pub async fn wait_for_invocations(&self, ids: &[String]) -> Vec<Value> {
        eventually(&format!("notifications for {ids:?}"), || {
            let bodies = self.bodies();
            let found: Option<Vec<Value>> = ids
                .iter()
                .map(|id| {
                    bodies
                        .iter()
                        .find(|b| b["invocation_id"] == id.as_str())
                        .cloned()
                })
                .collect();
            std::future::ready(found)
        })
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

async fn receive(State(state): State<Arc<ReceiverState>>, Json(body): Json<Value>) -> StatusCode {
    let hit = state.hits.fetch_add(1, Ordering::SeqCst);
    match state.behaviour {
        Behaviour::Hang => std::future::pending().await,
        Behaviour::FailFirst(n) if hit < n => StatusCode::INTERNAL_SERVER_ERROR,
        Behaviour::Accept | Behaviour::FailFirst(_) => {
            state.bodies.lock().expect("receiver lock").push(body);
            StatusCode::OK
        }
    }
}

/// Polls `check` every 20 ms until it gives `Some`, for up to [`WAIT`];
/// panics naming `what` when it never does.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The bytes of a file under `fixtures/`.
pub fn fixture(path: &str) -> Vec<u8> {
    let full = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(path);
    std::fs::read(&full).unwrap_or_else(|e| panic!("read {}: {e}", full.display()))
}

/// The format name (`jpeg`, `png`, `webp`, `gif`, `tiff`, `bmp`) and the
/// size of an encoded image, decoded with the `image` crate.
pub fn decoded(bytes: &[u8]) -> (String, u32, u32) {
    let format = image::guess_format(bytes).expect("a known image format");
    let name = format
        .extensions_str()
        .first()
        .copied()
        .unwrap_or("unknown");
    let name = if name == "jpg" { "jpeg" } else { name };
    let img = image::load_from_memory(bytes).expect("the image decodes");
    (name.to_string(), img.width(), img.height())
}
