//! Proof that a listener was never reached, without timing: a sentinel connection made now must
//! be the first one in its accept queue.

use tokio::net::{TcpListener, TcpStream};

/// Panics if any connection reached `listener` before this call (tests only).
pub async fn assert_no_prior_connection(listener: &TcpListener) {
    let addr = listener.local_addr().expect("listener address");
    let sentinel = TcpStream::connect(addr).await.expect("sentinel connects");
    let sentinel_addr = sentinel.local_addr().expect("sentinel address");
    let (_accepted, peer) =
        tokio::time::timeout(std::time::Duration::from_secs(15), listener.accept())
            .await
            .expect("sentinel accepted in time")
            .expect("accept");
    assert_eq!(
        peer, sentinel_addr,
        "a connection reached the listener before the sentinel"
    );
}
