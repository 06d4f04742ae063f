//! Error reporting: store failures must be visible, but a Redis outage must not turn into a
//! flood of identical Sentry events.
//!
//! Policy: every store error is logged (tracing, at `error` when the call failed closed). Sentry
//! (with the `sentry` feature) receives at most one event per error kind (`timeout`,
//! `connection_refused`, `io`, `server`, …) per interval (default 10 s); the event carries how
//! many errors of that kind were suppressed since the previous event, so the count is never lost.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::StoreError;

/// Default Sentry tag set on store-error events.
pub const DEFAULT_SENTRY_TAG: &str = "idempotency_store_down";
/// Default minimum interval between two Sentry events of the same error kind.
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub(crate) struct Reporter {
    pub(crate) tag: String,
    /// The tag's value; `None`: the error kind.
    pub(crate) tag_value: Option<String>,
    pub(crate) interval: Duration,
    /// error kind -> (when we last sent, errors suppressed since)
    sent: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl Reporter {
    pub(crate) fn new(tag: String, interval: Duration) -> Self {
        Self::with_value(tag, None, interval)
    }

    pub(crate) fn with_value(tag: String, tag_value: Option<String>, interval: Duration) -> Self {
        Self {
            tag,
            tag_value,
            interval,
            sent: Mutex::new(HashMap::new()),
        }
    }

    /// Decides whether this error should go to Sentry now; returns the number of errors of the
    /// same kind suppressed since the last event when it should.
    pub(crate) fn admit(&self, kind: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        match sent.get_mut(kind) {
            Some((last, suppressed)) if now.duration_since(*last) < self.interval => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                let n = *suppressed;
                *last = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                sent.insert(kind, (now, 0));
                Some(0)
            }
        }
    }

    #[cfg_attr(not(feature = "sentry"), allow(dead_code))]
    fn value_or(&self, kind: &str) -> String {
        self.tag_value.clone().unwrap_or_else(|| kind.to_owned())
    }

    /// Reports a store error for `key` (the full, namespaced key).
    #[cfg_attr(not(feature = "sentry"), allow(unused_variables))]
    pub(crate) fn store_error(&self, key: &str, error: &StoreError, failed_closed: bool) {
        let Some(suppressed) = self.admit(error.kind()) else {
            return;
        };
        #[cfg(feature = "sentry")]
        {
            use sentry_core::protocol::{Context, Level, Value};
            let mut event = sentry_core::event_from_error(error);
            event.level = Level::Error;
            event.message = Some(format!(
                "idempotency store error ({}); {}",
                error.kind(),
                if failed_closed {
                    "failed closed: nothing dispatched"
                } else {
                    "failed open: dispatched anyway"
                }
            ));
            event.tags.insert(self.tag.clone(), self.value_or(error.kind()));
            event
                .tags
                .insert("idempotency_error_kind".to_owned(), error.kind().to_owned());
            let mut ctx = std::collections::BTreeMap::new();
            ctx.insert("key".to_owned(), Value::from(key));
            ctx.insert("failed_closed".to_owned(), Value::from(failed_closed));
            ctx.insert("suppressed_since_last_event".to_owned(), Value::from(suppressed));
            event.contexts.insert("idempotency".to_owned(), Context::Other(ctx));
            sentry_core::Hub::with_active(|hub| hub.capture_event(event));
        }
    }

    /// Reports that renewal found a running job's claim lost.
    #[cfg_attr(not(feature = "sentry"), allow(unused_variables))]
    pub(crate) fn claim_lost(&self, key: &str) {
        let Some(_suppressed) = self.admit("claim_lost") else {
            return;
        };
        #[cfg(feature = "sentry")]
        {
            use sentry_core::protocol::{Event, Level};
            let mut event = Event::new();
            event.level = Level::Error;
            event.message = Some(format!("idempotency claim on `{key}` was lost while the job ran"));
            event.tags.insert(self.tag.clone(), self.value_or("claim_lost"));
            event
                .tags
                .insert("idempotency_error_kind".to_owned(), "claim_lost".to_owned());
            sentry_core::Hub::with_active(|hub| hub.capture_event(event));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_one_per_kind_per_interval_and_counts_the_rest() {
        let r = Reporter::new(DEFAULT_SENTRY_TAG.into(), Duration::from_millis(50));
        assert_eq!(r.admit("timeout"), Some(0));
        assert_eq!(r.admit("timeout"), None);
        assert_eq!(r.admit("timeout"), None);
        assert_eq!(r.admit("io"), Some(0), "kinds are limited independently");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(r.admit("timeout"), Some(2));
    }

    #[test]
    fn zero_interval_admits_everything() {
        let r = Reporter::new(DEFAULT_SENTRY_TAG.into(), Duration::ZERO);
        for _ in 0..3 {
            assert_eq!(r.admit("timeout"), Some(0));
        }
    }
}
