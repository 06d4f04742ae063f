//! Run once more after the active run: the store steps of the follow-up strategy
//! ([`IdempotencyLayer::with_run_once_more`](crate::IdempotencyLayer::with_run_once_more)).
//!
//! A trigger that finds its key **in progress** records its request as the key's follow-up (a
//! newer one replaces an older one) and is answered duplicate. The process whose run
//! **settles** takes the follow-up (`GETDEL`: exactly one taker), reopens the key under its own
//! token and runs it — then looks again, until none is left. The completing process runs it, not
//! a queue: it holds the key already, so no other trigger can slip in between, and the crate
//! needs no queue of its own.
//!
//! The one race: a trigger records its follow-up just after the run it saw in progress settled
//! and looked. So after recording, the trigger claims once more: still in progress → the run's
//! drain will find it; otherwise the trigger takes the follow-up itself (it may be a newer one)
//! and runs it, holding the key.

use std::sync::Arc;

use super::Protocol;
use crate::store::{BoxFuture, ClaimReply, ClaimToken, StoreError};

/// What a duplicate does after recording its follow-up.
pub(crate) enum Recheck {
    /// The run is still in progress: its drain runs the follow-up.
    Queued,
    /// The run settled meanwhile: run this follow-up, holding the key under `token`.
    Run { payload: Vec<u8>, token: ClaimToken },
    /// The run settled and someone else took the follow-up: nothing to do.
    Taken,
}

/// Records `payload` as `key`'s follow-up, then checks that a run will pick it up.
pub(crate) fn record(
    protocol: &Arc<Protocol>,
    key: Arc<str>,
    payload: Vec<u8>,
) -> BoxFuture<Result<Recheck, StoreError>> {
    let store = protocol.settings.store.clone();
    let ttl = protocol.settings.ttl;
    Box::pin(async move {
        store.clone().record_follow_up(key.clone(), payload, ttl).await?;
        let token = ClaimToken::generate();
        let (reply, _) = store.clone().claim(key.clone(), token.clone(), ttl, false).await?;
        let held = match reply {
            ClaimReply::Held(record) if record.state().is_in_progress() => return Ok(Recheck::Queued),
            ClaimReply::Held(_) => false,
            ClaimReply::Acquired => true,
        };
        let Some(payload) = store.clone().take_follow_up(key.clone()).await? else {
            if held {
                store.release(key, token).await?;
            }
            return Ok(Recheck::Taken);
        };
        // A completed record: take the key over for the follow-up run (or claim it, if it
        // expired meanwhile).
        let ours = held
            || store.clone().take_over(key.clone(), token.clone(), ttl).await?
            || matches!(
                store.clone().claim(key.clone(), token.clone(), ttl, false).await?.0,
                ClaimReply::Acquired
            );
        if ours {
            Ok(Recheck::Run { payload, token })
        } else {
            // Someone holds the key again: hand the follow-up back to their drain.
            store.record_follow_up(key, payload, ttl).await?;
            Ok(Recheck::Queued)
        }
    })
}

/// After a run settled: the follow-up to run next, with the key reopened under `token`.
pub(crate) fn drain(
    protocol: &Arc<Protocol>,
    key: Arc<str>,
    token: ClaimToken,
) -> BoxFuture<Result<Option<Vec<u8>>, StoreError>> {
    let store = protocol.settings.store.clone();
    let ttl = protocol.settings.ttl;
    Box::pin(async move {
        let Some(payload) = store.clone().take_follow_up(key.clone()).await? else {
            return Ok(None);
        };
        if store.clone().reopen(key.clone(), token, ttl).await? {
            return Ok(Some(payload));
        }
        // Someone else holds the key now: their run settles and drains; hand it back.
        store.record_follow_up(key, payload, ttl).await?;
        Ok(None)
    })
}
