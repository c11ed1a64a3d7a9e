//! A fleet for the load-awareness tests: an LB that weights by ORCA load
//! quickly, three calm backends and one busy one, and lb-client traffic so
//! that every backend has load to report.
//!
//! Each backend reports utilization = its measured qps / its capacity, as a
//! real server's load follows its traffic; the busy one has a quarter of
//! the others' capacity, so for the same traffic it reports 4× the
//! utilization.

use std::time::Duration;

use crate::*;

/// LB flags that make load weights apply within about a second.
pub const FAST_LOAD_FLAGS: [&str; 8] = [
    "--weight-blackout",
    "1s",
    "--orca-interval",
    "200ms",
    "--weight-update-period",
    "100ms",
    "--health-check-interval",
    "200ms",
];

/// The LB, its backends and the traffic that loads them.
pub struct BusyFleet {
    /// An LB with the embedded registry and [`FAST_LOAD_FLAGS`].
    pub lb: Lb,
    /// Three backends of capacity 400 calls/s.
    pub calm: Vec<Greeter>,
    /// One backend of capacity 100 calls/s.
    pub busy: Greeter,
    /// lb-client calls, 4 at a time, for the backends to measure.
    pub caller: Caller,
}

impl BusyFleet {
    /// Starts it all and waits until the LB's list carries load weights.
    pub async fn start() -> BusyFleet {
        let lb = Lb::embedded(&FAST_LOAD_FLAGS).await;
        let registry = format!("lb://{}", lb.addr);
        let calm = greeters(3, &registry, &["--capacity", "400"]).await;
        let busy = Greeter::start(&registry, &["--capacity", "100"]).await;
        assert!(busy.wait_registered(Duration::from_secs(10)).await);
        let ch = channel("greeter", &[lb.addr]);
        assert!(wait_backends(&ch, 4, Duration::from_secs(10)).await);
        let caller = Caller::start(&ch, 4, Duration::from_millis(1));
        // Weights need traffic (qps) and the 1 s blackout.
        let weighted = wait_until(Duration::from_secs(10), || {
            lb.get("/api/v1/services/greeter").1.contains("load weight")
        })
        .await;
        assert!(
            weighted,
            "load weights never applied: {}",
            lb.get("/api/v1/services/greeter").1
        );
        BusyFleet {
            lb,
            calm,
            busy,
            caller,
        }
    }
}
