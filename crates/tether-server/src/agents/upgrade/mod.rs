//! The HTTP upgrade on the tunnel listener: one router with the native (`tether.v1`) route,
//! the remotedialer route and the enrollment routes; `context.rs` holds what they share.

pub(crate) mod context;
pub(crate) mod handoff;
pub(crate) mod native;
pub(crate) mod remotedialer;
pub(crate) mod remotedialer_auth;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use http::StatusCode;

use self::context::{CONNECT_PATH, UpgradeContext};

/// The tunnel listener's router: `GET /v1/connect`, the remotedialer route, the enrollment
/// routes when configured, 404 for everything else.
pub(crate) fn router(state: Arc<UpgradeContext>) -> Router {
    let mut router = Router::new().route(CONNECT_PATH, get(native::upgrade));
    if let Some((path, _)) = &state.remotedialer {
        router = router.route(path, get(remotedialer::upgrade));
    }
    // The only routes a client without a certificate gets an answer from (besides a
    // token-only remotedialer route); every other route refuses it.
    if let Some(enrollment) = &state.enrollment {
        router = router.merge(crate::enrollment::routes(enrollment.clone()));
    }
    router
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(state)
}
