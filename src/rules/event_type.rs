use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A bucket event a rule can subscribe to, named as QingStor names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// An object was written (put, post, copy).
    CreateObject,
    /// An object was deleted.
    DeleteObject,
    /// A multipart upload was aborted.
    AbortMultipart,
    /// A multipart upload was completed, creating its object.
    CompleteMultipart,
}

/// The event types, for messages that list what is allowed.
const ALLOWED: &str = "create_object, delete_object, abort_multipart, complete_multipart";

impl EventType {
    /// Every event type, in the order QingStor's documentation lists them.
    pub const ALL: [EventType; 4] = [
        EventType::CreateObject,
        EventType::DeleteObject,
        EventType::AbortMultipart,
        EventType::CompleteMultipart,
    ];

    /// The wire name, e.g. `create_object`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::CreateObject => "create_object",
            EventType::DeleteObject => "delete_object",
            EventType::AbortMultipart => "abort_multipart",
            EventType::CompleteMultipart => "complete_multipart",
        }
    }

    /// Parses a wire name exactly (case matters, as in QingStor's API).
    pub fn parse(name: &str) -> Result<EventType, UnknownEventType> {
        EventType::ALL
            .into_iter()
            .find(|t| t.as_str() == name)
            .ok_or_else(|| UnknownEventType(crate::shown(name)))
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventType {
    type Err = UnknownEventType;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventType::parse(s)
    }
}

/// A name that is not one of the four event types.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown event type `{0}`; allowed: {ALLOWED}")]
pub struct UnknownEventType(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Ok(t));
            assert_eq!(t.to_string(), t.as_str());
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.as_str()));
            assert_eq!(serde_json::from_str::<EventType>(&json).unwrap(), t);
        }
    }

    #[test]
    fn unknown_name_lists_the_allowed_ones() {
        let err = EventType::parse("CreateObject").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown event type `CreateObject`; allowed: create_object, delete_object, \
             abort_multipart, complete_multipart"
        );
    }
}
