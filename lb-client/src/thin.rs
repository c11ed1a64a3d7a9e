//! Socket options for thin streams: connections that carry a few small
//! messages at a time (server lists, heartbeats, lease keep-alives), where
//! what matters is how late one message arrives, not how many bytes flow.
//!
//! TCP's defaults are tuned for bulk transfer. On a link that loses
//! packets, two of them make one small write arrive seconds late:
//! - **exponential backoff**: a segment lost three times in a row waits
//!   RTO + 2·RTO + 4·RTO before its fourth try. Linux's linear timeouts for
//!   thin streams (`TCP_THIN_LINEAR_TIMEOUTS`) keep the first six retries
//!   one RTO apart while fewer than four segments are in flight;
//! - **an inflated RTO**: during loss recovery the timestamps a receiver
//!   echoes are those of the oldest segment it waits for (RFC 7323), so
//!   RTT samples include the recovery time and the RTO climbs to several
//!   seconds on a path whose real round trip is milliseconds. A ceiling on
//!   the RTO (`TCP_RTO_MAX_MS`, Linux 6.15) of [`RTO_MAX`] keeps every
//!   retry within a second of the last.
//!
//! Both are best effort: a kernel without them still connects, with its
//! defaults.

use std::time::Duration;

/// Ceiling on the retransmission timeout of thin-stream connections; the
/// kernel accepts nothing lower than one second.
pub const RTO_MAX: Duration = Duration::from_secs(1);

/// Sets the thin-stream options on `tcp`: no Nagle delay, linear
/// retransmission timeouts, and an RTO of at most [`RTO_MAX`]. Errors are
/// ignored (an older kernel keeps its defaults).
pub fn tune(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    let sock = socket2::SockRef::from(tcp);
    let _ = sock.set_tcp_thin_linear_timeouts(true);
    set_rto_max(&sock, RTO_MAX);
}

#[cfg(target_os = "linux")]
fn set_rto_max(sock: &socket2::SockRef<'_>, max: Duration) {
    use std::os::fd::AsRawFd;
    /// `TCP_RTO_MAX_MS` from `linux/tcp.h` (not in every libc release yet).
    const TCP_RTO_MAX_MS: libc::c_int = 44;
    let ms = max.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: a valid socket descriptor borrowed for the call, and a
    // pointer to a c_int that outlives it, with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_RTO_MAX_MS,
            (&ms as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::trace!(
            error = %std::io::Error::last_os_error(),
            "TCP_RTO_MAX_MS not set; the kernel's ceiling stays"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn set_rto_max(_: &socket2::SockRef<'_>, _: Duration) {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The options reach the kernel (on a kernel that has them).
    #[tokio::test]
    async fn options_are_set() {
        use std::os::fd::AsRawFd;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        tune(&tcp);
        assert!(tcp.nodelay().unwrap());
        let sock = socket2::SockRef::from(&tcp);
        assert!(sock.tcp_thin_linear_timeouts().unwrap());
        let mut ms: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: as in set_rto_max, reading into a c_int of the given size.
        let rc = unsafe {
            libc::getsockopt(
                tcp.as_raw_fd(),
                libc::IPPROTO_TCP,
                44,
                (&mut ms as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc == 0 {
            assert_eq!(ms, 1000);
        } else {
            eprintln!(
                "TCP_RTO_MAX_MS unknown to this kernel: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
