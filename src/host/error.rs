use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::queue::Refused;
use crate::action::ActionError;
use crate::cloudfunc::InvokeError;
use crate::imaging::ImagingError;
use crate::rules::RuleBookError;
use crate::store::StoreError;

/// An error answered as JSON `{code, message, request_id}`; the status code
/// is decided here and nowhere else.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: impl Into<String>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code: code.into(),
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn bad_request(code: &str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 503 with `Retry-After` while the queue is full; 413 for a request
    /// that fires more invocations than the queue ever holds, which no
    /// retry would get in.
    pub fn queue_refused(refused: Refused) -> ApiError {
        match refused {
            Refused::Full { depth } => ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "queue_full",
                    format!("the work queue is full ({depth} waiting); retry later"),
                )
            },
            Refused::TooMany { asked, bound } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_invocations",
                format!(
                    "the request fires {asked} invocations, more than the work queue holds \
                     ({bound}, --queue); send fewer events at a time, or raise --queue"
                ),
            ),
            Refused::Journal { message } => ApiError {
                retry_after: Some(5),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "journal_unavailable",
                    format!(
                        "the journal of pending invocations (.imgfunc/pending.jsonl) cannot \
                         record the events' invocations: {message}; nothing was taken, retry \
                         later"
                    ),
                )
            },
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        let status = match &e {
            StoreError::NotFound { .. } | StoreError::NoSuchBucket { .. } => StatusCode::NOT_FOUND,
            StoreError::InvalidKey { .. }
            | StoreError::InvalidBucket { .. }
            | StoreError::InvalidMetadata { .. } => StatusCode::BAD_REQUEST,
            StoreError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            StoreError::Backend { .. } => StatusCode::BAD_GATEWAY,
        };
        ApiError::new(status, e.code(), e.to_string())
    }
}

impl From<ImagingError> for ApiError {
    fn from(e: ImagingError) -> ApiError {
        let status = if e.is_limit() {
            StatusCode::PAYLOAD_TOO_LARGE
        } else if matches!(
            e,
            ImagingError::Watermark { .. } | ImagingError::Operation { .. }
        ) {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNPROCESSABLE_ENTITY
        };
        ApiError::new(status, e.code(), e.to_string())
    }
}

impl From<InvokeError> for ApiError {
    fn from(e: InvokeError) -> ApiError {
        match e {
            InvokeError::Store(e) => e.into(),
            InvokeError::Imaging(e) => e.into(),
            e @ InvokeError::NoObject { .. } => ApiError::bad_request(e.code(), e.to_string()),
            e @ InvokeError::Internal(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.code(), e.to_string())
            }
            e @ InvokeError::WatermarkFetch { .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, e.code(), e.to_string())
            }
        }
    }
}

impl From<ActionError> for ApiError {
    fn from(e: ActionError) -> ApiError {
        ApiError::bad_request("invalid_action", e.to_string())
    }
}

impl From<RuleBookError> for ApiError {
    fn from(e: RuleBookError) -> ApiError {
        match e {
            RuleBookError::Invalid(e) => ApiError::bad_request("invalid_rule", e.to_string()),
            other => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "rules_io",
                other.to_string(),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let request_id = super::new_id();
        if self.status.is_server_error() {
            // A field, which the log quotes with its control characters
            // escaped: a message can hold a key, and a key a line break.
            tracing::warn!(
                code = %self.code,
                request_id = %request_id,
                error = self.message.as_str(),
                "answered with a server error"
            );
        }
        let body = json!({"code": self.code, "message": self.message, "request_id": request_id});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
