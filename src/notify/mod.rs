//! Delivering results to a rule's `notify_url`, with bounded retries.
//!
//! A result is POSTed as JSON; any 2xx is a success. Connection errors,
//! timeouts, 408, 429 and 5xx are retried after a fixed delay, up to
//! [`NotifyConfig::attempts`]; other statuses (3xx, since redirects are not
//! followed, and 4xx) mean the receiver refused the payload and are not
//! retried. A payload that could not be delivered is appended to the
//! dead-letter file, so that it is never dropped silently.

mod dead_letter;

use std::collections::HashMap;
use std::error::Error as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use thiserror::Error;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use dead_letter::DeadLetters;

/// QingStor's numbers: three attempts, 5 s each, 1 s apart.
pub const DEFAULT_ATTEMPTS: u32 = 3;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_DELAY: Duration = Duration::from_secs(1);
/// Deliveries under way at once. Each holds a connection for up to
/// `attempts x timeout` (17 s by default against a receiver that never
/// answers), so without a bound a dead receiver at a few hundred events a
/// second would hold thousands of sockets.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 128;

/// How deliveries are attempted and where failures are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyConfig {
    /// Attempts per delivery, the first included; 0 counts as 1.
    pub attempts: u32,
    /// Time allowed for one attempt: connecting, sending and the response head.
    pub timeout: Duration,
    /// Wait between two attempts.
    pub delay: Duration,
    /// JSON-lines file that receives every payload that could not be delivered.
    pub dead_letter: PathBuf,
    /// Deliveries under way at once; see [`Notifier::register`]. 0 counts as 1.
    pub max_in_flight: usize,
}

impl NotifyConfig {
    /// The default attempts, timeout and delay, with failures kept in `dead_letter`.
    pub fn new(dead_letter: impl Into<PathBuf>) -> NotifyConfig {
        NotifyConfig {
            attempts: DEFAULT_ATTEMPTS,
            timeout: DEFAULT_TIMEOUT,
            delay: DEFAULT_DELAY,
            dead_letter: dead_letter.into(),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

/// A successful delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Attempts made, the successful one included.
    pub attempts: u32,
    /// The receiver's 2xx status.
    pub status: StatusCode,
}

/// Why a payload was not delivered. Either way it is in the dead-letter file
/// (unless writing there failed too, which is logged as an error).
#[derive(Debug, Error)]
pub enum NotifyError {
    /// The URL is not an http(s) URL; no request was made.
    #[error("notify_url `{url}` {reason}")]
    InvalidUrl { url: String, reason: String },
    /// Every attempt failed, or the receiver refused the payload.
    #[error("notify {url}: failed after {attempts} attempt(s): {last_error}")]
    Failed {
        url: String,
        attempts: u32,
        last_error: String,
    },
    /// The HTTP client could not be built (e.g. no TLS roots).
    #[error("cannot build the HTTP client for notifications: {0}")]
    Client(#[source] reqwest::Error),
}

/// Delivers payloads to notify URLs. One per process, shared by reference.
#[derive(Debug)]
pub struct Notifier {
    client: reqwest::Client,
    config: NotifyConfig,
    dead_letters: DeadLetters,
    /// Deliveries under way (URL, payload and attempts so far), so that a
    /// shutdown that cannot wait for them keeps them in the dead-letter
    /// file ([`Notifier::abandon_pending`]).
    pending: Mutex<HashMap<u64, Pending>>,
    next_delivery: AtomicU64,
    in_flight: Arc<Semaphore>,
}

/// A delivery noted by [`Notifier::register`], holding its room among
/// those under way until [`Notifier::deliver_registered`] ends.
#[derive(Debug)]
pub struct Registered {
    id: u64,
    _room: Option<OwnedSemaphorePermit>,
}

#[derive(Debug)]
struct Pending {
    url: String,
    payload: Value,
    attempts: u32,
}

/// What one attempt came to.
enum Attempt {
    Delivered(StatusCode),
    /// Worth another try: the receiver may be down or busy.
    Retry(String),
    /// The receiver answered and refused; trying again would not help.
    Refused(String),
}

impl Notifier {
    /// A notifier with its own HTTP client. Redirects are not followed, as
    /// webhook senders usually do not: a moved endpoint should be fixed in
    /// the rule, not silently turned into a GET.
    pub fn new(config: NotifyConfig) -> Result<Notifier, NotifyError> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("imgfunc/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(NotifyError::Client)?;
        Ok(Notifier {
            in_flight: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            client,
            dead_letters: DeadLetters::new(config.dead_letter.clone()),
            config,
            pending: Mutex::new(HashMap::new()),
            next_delivery: AtomicU64::new(0),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &NotifyConfig {
        &self.config
    }

    /// POSTs `payload` to `url` until it is accepted or the attempts run out;
    /// on failure the payload goes to the dead-letter file and the error
    /// names the URL, the attempts made and the last error.
    pub async fn deliver(&self, url: &str, payload: &Value) -> Result<Delivery, NotifyError> {
        let registered = self.register(url, payload).await;
        self.deliver_registered(registered, url, payload).await
    }

    /// Notes a delivery, then waits until fewer than
    /// [`NotifyConfig::max_in_flight`] are under way; make it with
    /// [`Notifier::deliver_registered`]. A shutdown that stops it while it
    /// waits or runs keeps it in the dead-letter file
    /// ([`Notifier::abandon_pending`]). The host's workers wait here before
    /// they go on to the next job, so a slow or dead receiver slows the work
    /// down (the queue fills and new events are refused with 503) rather
    /// than piling up connections.
    pub async fn register(&self, url: &str, payload: &Value) -> Registered {
        let id = self.next_delivery.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut pending) = self.pending.lock() {
            let (url, payload) = (url.to_string(), payload.clone());
            pending.insert(
                id,
                Pending {
                    url,
                    payload,
                    attempts: 0,
                },
            );
        }
        // The semaphore is never closed, so this only waits.
        let room = self.in_flight.clone().acquire_owned().await.ok();
        Registered { id, _room: room }
    }

    /// [`Notifier::deliver`] for a delivery [`Notifier::register`] noted.
    pub async fn deliver_registered(
        &self,
        registered: Registered,
        url: &str,
        payload: &Value,
    ) -> Result<Delivery, NotifyError> {
        let id = registered.id;
        let result = match check_url(url) {
            Ok(()) => self.deliver_tracked(id, url, payload).await,
            Err(reason) => Err(NotifyError::InvalidUrl {
                url: without_password(url),
                reason: masked(url, &reason),
            }),
        };
        // Whoever takes the delivery out of `pending` keeps its record: a
        // shutdown that abandoned it has written it already.
        let claimed = self
            .pending
            .lock()
            .map(|mut pending| pending.remove(&id).is_some())
            .unwrap_or(true);
        if claimed {
            match &result {
                Err(NotifyError::Failed {
                    attempts,
                    last_error,
                    ..
                }) => self.give_up(url, *attempts, last_error, payload).await,
                Err(error @ NotifyError::InvalidUrl { .. }) => {
                    self.give_up(url, 0, &error.to_string(), payload).await
                }
                _ => {}
            }
        }
        result
    }

    /// Writes every delivery still under way to the dead-letter file, for a
    /// shutdown that has stopped them: each record's error says so. Call it
    /// once the deliveries are aborted; one still running could succeed and
    /// be kept as well, but one that fails after this is not kept twice.
    pub async fn abandon_pending(&self) -> usize {
        let pending: Vec<Pending> = match self.pending.lock() {
            Ok(mut map) => map.drain().map(|(_, p)| p).collect(),
            Err(_) => Vec::new(),
        };
        for p in &pending {
            let error = "shutdown: delivery still under way when the drain timeout ended";
            self.give_up(&p.url, p.attempts, error, &p.payload).await;
        }
        pending.len()
    }

    /// Notes the attempts a delivery has made; one that was abandoned in
    /// the meantime stays out.
    fn track(&self, id: u64, attempts: u32) {
        if let Ok(mut pending) = self.pending.lock()
            && let Some(p) = pending.get_mut(&id)
        {
            p.attempts = attempts;
        }
    }

    async fn deliver_tracked(
        &self,
        id: u64,
        url: &str,
        payload: &Value,
    ) -> Result<Delivery, NotifyError> {
        let attempts = self.config.attempts.max(1);
        let mut made = 0;
        let mut last_error = String::new();
        while made < attempts {
            if made > 0 {
                tokio::time::sleep(self.config.delay).await;
            }
            made += 1;
            self.track(id, made);
            match self.attempt(url, payload).await {
                Attempt::Delivered(status) => {
                    tracing::debug!(url = without_password(url), attempts = made, %status, "notification delivered");
                    return Ok(Delivery {
                        attempts: made,
                        status,
                    });
                }
                Attempt::Retry(error) => {
                    tracing::debug!(url = without_password(url), attempt = made, error = %masked(url, &error), "notification attempt failed");
                    last_error = error;
                }
                Attempt::Refused(error) => {
                    last_error = error;
                    break;
                }
            }
        }
        Err(NotifyError::Failed {
            url: without_password(url),
            attempts: made,
            last_error: masked(url, &last_error),
        })
    }

    async fn attempt(&self, url: &str, payload: &Value) -> Attempt {
        let response = match self.client.post(url).json(payload).send().await {
            Ok(response) => response,
            Err(error) => return Attempt::Retry(self.describe(&error)),
        };
        let status = response.status();
        if status.is_success() {
            return Attempt::Delivered(status);
        }
        let error = format!("HTTP {status}{}", body_excerpt(response).await);
        let retry = status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT;
        if retry {
            Attempt::Retry(error)
        } else {
            Attempt::Refused(error)
        }
    }

    /// A transport error with its causes, which say what actually went
    /// wrong (`Connection refused`); reqwest's own message does not.
    fn describe(&self, error: &reqwest::Error) -> String {
        if error.is_timeout() {
            return format!("no response within {:?}", self.config.timeout);
        }
        let mut message = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = cause.source();
        }
        message
    }

    async fn give_up(&self, url: &str, attempts: u32, last_error: &str, payload: &Value) {
        let (shown, error) = (without_password(url), masked(url, last_error));
        let (url, last_error) = (&shown, error.as_str());
        match self
            .dead_letters
            .append(url, attempts, last_error, payload)
            .await
        {
            Ok(()) => tracing::warn!(
                url,
                attempts,
                error = last_error,
                dead_letter = %self.config.dead_letter.display(),
                "notification not delivered; payload kept in the dead-letter file"
            ),
            // The log is then the only place the payload is kept.
            Err(error) => tracing::error!(
                url,
                attempts,
                error = last_error,
                dead_letter = %self.config.dead_letter.display(),
                write_error = %error,
                payload = %payload,
                "notification not delivered, and the dead-letter file cannot be written: \
                 the payload is in this line only"
            ),
        }
    }
}

/// `url` with the password of its user info, if any, shown as `***`: the
/// dead-letter file and the log are read by more people than the rules.
pub fn without_password(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            if parsed.set_password(Some("***")).is_err() {
                return url.to_string();
            }
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

/// `text` with `url` in it, as written or as the HTTP client prints it
/// after parsing, shown [`without_password`].
fn masked(url: &str, text: &str) -> String {
    let shown = without_password(url);
    let mut text = text.replace(url, &shown);
    if let Ok(parsed) = reqwest::Url::parse(url) {
        text = text.replace(parsed.as_str(), &shown);
    }
    text
}

/// Only http(s) URLs with a host are delivered to.
fn check_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| format!("is not a valid URL ({e}); expected http://... or https://..."))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "has scheme `{}`; only http and https are supported",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("has no host".to_string());
    }
    Ok(())
}

/// The start of an error response's body, which often says why.
async fn body_excerpt(mut response: reqwest::Response) -> String {
    const LIMIT: usize = 200;
    let mut body = Vec::new();
    while body.len() < LIMIT {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(LIMIT)]);
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

#[cfg(test)]
mod tests;
