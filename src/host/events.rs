//! `POST /v1/events`, `POST /v1/invoke` and `/readyz`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::queue::{Refused, jobs_for};
use super::{ApiError, AppState, JsonBody, detach, new_id};
use crate::cloudfunc;
use crate::events::parse_body;
use crate::rules::Rule;

/// Takes S3 event records or QingStor-style events; answers 202 with one id
/// per invocation, or 503 (nothing queued) when the queue cannot take them all.
pub async fn post_events(
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    // Parsing and matching take up to milliseconds an event (a bucket's
    // filters may run as regular expressions): off the async workers, so
    // that other requests are answered meanwhile.
    // As many at a time as there are image threads (the semaphore is never
    // closed).
    let turn = Arc::clone(&state.matching).acquire_owned().await.ok();
    let matcher = Arc::clone(&state);
    let (jobs, unmatched, skipped) = super::finish(tokio::task::spawn_blocking(move || {
        let _turn = turn;
        jobs_of(&matcher, &body)
    }))
    .await?;
    let invocations: Vec<Value> = jobs
        .iter()
        .map(|j| {
            json!({
                "id": j.id,
                "rule_id": j.rule.id,
                "bucket": j.event.bucket,
                "key": j.event.key,
                "event_type": j.event.event_type.as_str(),
            })
        })
        .collect();
    state
        .queue
        .try_push_all(jobs)
        .map_err(ApiError::queue_refused)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "invocations": invocations,
            "unmatched": unmatched,
            "skipped": skipped,
        })),
    ))
}

/// The most events one request may carry; each is matched against its
/// bucket's rules (see `MAX_REGEX_FILTER_BYTES_PER_BUCKET`).
pub const MAX_EVENTS_PER_REQUEST: usize = 1000;

/// The jobs `body`'s events fire, how many events fired none, and the
/// records skipped. Refused whole past the queue's bound: the rest is
/// counted, not built.
fn jobs_of(
    state: &AppState,
    body: &[u8],
) -> Result<(Vec<super::queue::Job>, usize, Vec<String>), ApiError> {
    let parsed =
        parse_body(body).map_err(|e| ApiError::bad_request("invalid_event", e.to_string()))?;
    if parsed.events.len() > MAX_EVENTS_PER_REQUEST {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_events",
            format!(
                "the request carries {} events, more than {MAX_EVENTS_PER_REQUEST}; send them \
                 in smaller batches",
                parsed.events.len()
            ),
        ));
    }
    let mut jobs = Vec::new();
    let mut unmatched = 0;
    let bound = state.config.queue_bound;
    let mut events = parsed.events.into_iter();
    for event in events.by_ref() {
        let fired = jobs_for(state, event);
        if fired.is_empty() {
            unmatched += 1;
        }
        jobs.extend(fired);
        if jobs.len() > bound {
            break;
        }
    }
    if jobs.len() > bound {
        let rest: usize = events
            .map(|e| state.rules.matching(&e.bucket, e.event_type, &e.key).len())
            .sum();
        return Err(ApiError::queue_refused(Refused::TooMany {
            asked: jobs.len() + rest,
            bound,
        }));
    }
    Ok((jobs, unmatched, parsed.skipped))
}

/// Runs one event against an inline rule and answers with the result JSON
/// that `notify_url` would receive. Body: `{"event": ..., "rule": {...}}`
/// where `event` is any format `/v1/events` takes and `rule` one notification;
/// the rule runs whatever its `event_types` and `object_filters` say.
pub async fn invoke(
    State(state): State<Arc<AppState>>,
    JsonBody(body): JsonBody,
) -> Result<Json<cloudfunc::InvocationResult>, ApiError> {
    let body: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_request", format!("body is not JSON: {e}")))?;
    let event_json = body
        .get("event")
        .ok_or_else(|| ApiError::bad_request("invalid_request", "missing field `event`"))?;
    let parsed = parse_body(event_json.to_string().as_bytes())
        .map_err(|e| ApiError::bad_request("invalid_event", e.to_string()))?;
    let event = parsed.events.into_iter().next().ok_or_else(|| {
        ApiError::bad_request("invalid_event", "event: no object event to act on")
    })?;
    let rule_json = body
        .get("rule")
        .ok_or_else(|| ApiError::bad_request("invalid_request", "missing field `rule`"))?;
    let rule = Rule::from_json(rule_json, &event.bucket)
        .and_then(|rule| {
            // As a rule set on the event's bucket would be: an image rule
            // only on a bucket the store takes.
            state
                .rules
                .check_buckets(&event.bucket, std::slice::from_ref(&rule))
                .map_err(|e| {
                    // Named within the one rule given, not a rule set.
                    let field = e.field.strip_prefix("notifications[0].").map(str::to_owned);
                    match field {
                        Some(field) => e.renamed(field),
                        None => e,
                    }
                })?;
            Ok(rule)
        })
        .map_err(|e| ApiError::bad_request("invalid_rule", e.under("rule").to_string()))?;
    // A turn first: it waits while a queued job runs alone.
    let turn = state.queue.shared_turn().await;
    let slot = state.runtime.image_slot().await;
    // Once it has its slot the invocation runs to the end even if the client
    // goes away: its outputs are all written, or its result says which.
    let result = detach(&state.clone(), async move {
        let _turn = turn;
        Ok(cloudfunc::invoke(&state.runtime, &new_id(), &rule, &event, slot, || || {}).await)
    })
    .await?;
    Ok(Json(result))
}

/// Ready while serving and not shutting down; reports the queue.
pub async fn ready(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Value>) {
    let ready = state.ready.load(Ordering::SeqCst);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "ready": ready,
            "queue_depth": state.queue.depth(),
            "queue_bound": state.config.queue_bound,
            "workers": state.config.workers,
            "store": state.store.describe(),
        })),
    )
}
