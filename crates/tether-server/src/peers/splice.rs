//! Two mux streams joined end to end (the relay's hop): bytes both ways, a FIN passed on as a
//! FIN, and an error on either side reset onto the other, so an end never sees a clean EOF
//! for a broken stream.

use tether_mux::MuxStream;
use tether_proto::ResetCode;

/// Copies between `a` and `b` until both directions have finished or one fails.
pub(crate) async fn splice(mut a: MuxStream, mut b: MuxStream) {
    if let Err(err) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
        let reason = format!("relayed stream failed: {err}");
        a.reset(ResetCode::TargetReset, &reason);
        b.reset(ResetCode::TargetReset, &reason);
    }
}
