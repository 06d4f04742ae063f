//! The claim protocol: claim → renew* → keep | release, and what happens on every path in
//! between — a lost reply, a dropped caller, a failed release, a store that is down. It knows
//! nothing about tower or HTTP; the tower futures (core and HTTP) drive it.
//!
//! - [`Protocol::begin`] starts a claim ([`Claiming`]), coalesced with concurrent claims on the
//!   same key when enabled, and resolves to a [`Decision`]: dispatch (holding a [`Lease`]),
//!   duplicate, or store unavailable — with the store-error policy and shadow mode applied and the
//!   outcome logged.
//! - A [`Lease`] is the claim while the job runs ([`Running`]: renewal, maximum hold, lost-claim
//!   detection) and settles it: complete its record (or keep the claim), or release it
//!   ([`Settling`]).
//! - Whatever a caller leaves unfinished (a claim whose reply was lost, a future dropped while
//!   claiming or releasing, a release that failed) goes to the one [`Background`] owner.
//!
//! Round trips: a claim costs one (`SET NX GET PX`, which also returns the record a duplicate
//! sees), a duplicate one, a completed job two (claim, complete), a blocked job two (claim,
//! release); without records (`with_records(false)`) a kept job costs one.

mod background;
mod claim;
pub(crate) mod follow_up;
mod lease;

use std::sync::Arc;

pub(crate) use background::Background;
pub(crate) use claim::{Claiming, Coalescer, Decision};
pub(crate) use lease::{Lease, Running, Settling};

use crate::IdempotencyKey;
use crate::observe::Observers;
use crate::settings::{ConfigError, Settings};
use crate::store::ClaimToken;

/// One layer's protocol: its settings, validated, plus the shared coalescer and background
/// owner. Services and futures hold it in an `Arc`.
#[derive(Debug)]
// Aligned so the `Arc`'s reference counts, which every call's futures update from both worker
// threads, sit on their own cache line instead of the settings every call reads.
#[repr(align(128))]
pub(crate) struct Protocol {
    pub(crate) settings: Settings,
    /// The settings' observers, with metric handles registered when the service was made.
    pub(crate) observers: Arc<Observers>,
    /// Why the settings cannot work, when the layer was used without `build()`: every call is
    /// refused with this instead of running with them.
    pub(crate) invalid: Option<ConfigError>,
}

impl Protocol {
    pub(crate) fn new(settings: Settings) -> Arc<Self> {
        let invalid = settings.validate().err();
        if let Some(error) = &invalid {
            tracing::error!(error = %error, "idempotency layer has invalid settings; every call will be refused (call `build()` to catch this at startup)");
        }
        let mut observers = settings.observers.clone();
        observers.bind();
        let observers = Arc::new(observers);
        settings.background.observe(observers.clone());
        Arc::new(Self {
            settings,
            observers,
            invalid,
        })
    }

    /// The key as stored: the namespace plus the key.
    pub(crate) fn full_key(&self, key: &IdempotencyKey) -> Arc<str> {
        if self.settings.namespace.is_empty() {
            key.shared()
        } else {
            Arc::from(format!("{}{}", self.settings.namespace, key).as_str())
        }
    }

    /// Starts claiming `key`, as `owner` when the caller has a stable identity for this job,
    /// else under a fresh token. With `takeover` (the identity of a human override, e.g. its
    /// delivery id) the claim is an override: deduplicated by that identity, and taking `key`
    /// over from whoever holds it.
    pub(crate) fn begin(
        self: &Arc<Self>,
        key: IdempotencyKey,
        owner: Option<ClaimToken>,
        takeover: Option<&str>,
    ) -> Claiming {
        Claiming::start(self, key, owner, takeover)
    }
}
