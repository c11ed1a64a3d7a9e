//! Socket options for thin streams: connections that carry a few small
//! messages at a time (server lists, heartbeats, lease keep-alives), where
//! what matters is how late one message arrives, not how many bytes flow.
//!
//! TCP's defaults are tuned for bulk transfer. On a link that loses
//! packets, three of them make one small write arrive seconds late:
//! - **exponential backoff**: a segment lost three times in a row waits
//!   RTO + 2·RTO + 4·RTO before its fourth try. Linux's linear timeouts for
//!   thin streams (`TCP_THIN_LINEAR_TIMEOUTS`) keep the first six retries
//!   one RTO apart while fewer than four segments are in flight;
//! - **an inflated RTO**: during loss recovery the timestamps a receiver
//!   echoes are those of the oldest segment it waits for (RFC 7323), so
//!   RTT samples include the recovery time and the RTO climbs to several
//!   seconds on a path whose real round trip is milliseconds. A ceiling on
//!   the RTO (`TCP_RTO_MAX_MS`, Linux 6.15) of [`RTO_MAX`] keeps every
//!   retry within a second of the last;
//! - **the RTO floor**: Linux's RTO is the smoothed round trip plus a
//!   variance term of at least 200 ms (`tcp_rto_min`), room for a bulk
//!   receiver's delayed ACKs. A thin stream's lost list waits that long
//!   for each try even on a path of a millisecond. A floor of [`RTO_MIN`]
//!   (`TCP_RTO_MIN_US`, Linux 6.15) lowers that term's minimum to 50 ms;
//!   where the round trip varies more, the variance term is larger anyway,
//!   and a retry sent early is a few duplicate bytes.
//!
//! All are best effort: a kernel without them still connects, with its
//! defaults. Measured on a link losing 30 % of packets each way (the
//! slow-links test): the floor took a list change's 90th percentile from
//! 0.8 s to 0.42–0.49 s in three runs of four (1.3 s in the fourth).

use std::time::Duration;

/// Ceiling on the retransmission timeout of thin-stream connections; the
/// kernel accepts nothing lower than one second.
pub const RTO_MAX: Duration = Duration::from_secs(1);

/// Floor of the variance term the kernel adds to the smoothed round trip
/// for the retransmission timeout of thin-stream connections (its default
/// is 200 ms).
pub const RTO_MIN: Duration = Duration::from_millis(50);

/// `TCP_RTO_MAX_MS` and `TCP_RTO_MIN_US` from `linux/tcp.h` (not in every
/// libc release yet).
#[cfg(target_os = "linux")]
mod opt {
    pub const TCP_RTO_MAX_MS: libc::c_int = 44;
    pub const TCP_RTO_MIN_US: libc::c_int = 45;
}

/// Sets the thin-stream options on `tcp`: no Nagle delay, linear
/// retransmission timeouts, and an RTO of at most [`RTO_MAX`] whose
/// variance term is at least 50 ms. Errors are ignored (an older kernel
/// keeps its defaults).
pub fn tune(tcp: &tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
    let sock = socket2::SockRef::from(tcp);
    let _ = sock.set_tcp_thin_linear_timeouts(true);
    #[cfg(target_os = "linux")]
    {
        set_int(
            &sock,
            opt::TCP_RTO_MAX_MS,
            "TCP_RTO_MAX_MS",
            RTO_MAX.as_millis(),
        );
        set_int(
            &sock,
            opt::TCP_RTO_MIN_US,
            "TCP_RTO_MIN_US",
            RTO_MIN.as_micros(),
        );
    }
}

/// Sets one integer TCP option, logging (at trace) a kernel that lacks it.
#[cfg(target_os = "linux")]
fn set_int(sock: &socket2::SockRef<'_>, option: libc::c_int, name: &str, value: u128) {
    use std::os::fd::AsRawFd;
    let value = value.min(i32::MAX as u128) as libc::c_int;
    // SAFETY: a valid socket descriptor borrowed for the call, and a
    // pointer to a c_int that outlives it, with its exact size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_TCP,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::trace!(
            option = name,
            error = %std::io::Error::last_os_error(),
            "TCP option not set; the kernel's default stays"
        );
    }
}

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
        let get = |option: libc::c_int| {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: as in set_int, reading into a c_int of the given size.
            let rc = unsafe {
                libc::getsockopt(
                    tcp.as_raw_fd(),
                    libc::IPPROTO_TCP,
                    option,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            (rc == 0).then_some(v)
        };
        match get(opt::TCP_RTO_MAX_MS) {
            Some(ms) => assert_eq!(ms, 1000),
            None => eprintln!("TCP_RTO_MAX_MS unknown to this kernel"),
        }
        match get(opt::TCP_RTO_MIN_US) {
            // The kernel keeps it in jiffies: 50 ms comes back rounded up
            // to its tick.
            Some(us) => assert!((50_000..=60_000).contains(&us), "{us} µs"),
            None => eprintln!("TCP_RTO_MIN_US unknown to this kernel"),
        }
    }
}
