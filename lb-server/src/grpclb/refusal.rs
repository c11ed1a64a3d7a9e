//! Why a BalanceLoad stream was refused or closed by the LB: one name per
//! reason, the `reason` label of `lb_streams_refused_total`.

/// Why a stream was refused or closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `initial_request` within `--initial-request-timeout`.
    InitialRequestTimeout,
    /// The stream ended before its `initial_request`.
    NoInitialRequest,
    /// The first message was not an `initial_request`.
    NotInitialRequest,
    /// The requested name is longer than any service name may be.
    NameTooLong,
    /// No service of that name (after aliases and suffixes).
    UnknownService,
    /// `--max-streams` streams are open.
    TooManyStreams,
    /// `--max-streams-per-peer` streams are open from this address.
    TooManyStreamsPerPeer,
    /// A request over `--max-message-size`.
    MessageTooLarge,
    /// The request stream broke (the client went away).
    StreamError,
    /// Client stats sent faster than `--client-stats-max-rate`.
    ClientStatsRate,
}

impl Refusal {
    /// The metric label and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::InitialRequestTimeout => "initial_request_timeout",
            Refusal::NoInitialRequest => "no_initial_request",
            Refusal::NotInitialRequest => "not_initial_request",
            Refusal::NameTooLong => "name_too_long",
            Refusal::UnknownService => "unknown_service",
            Refusal::TooManyStreams => "too_many_streams",
            Refusal::TooManyStreamsPerPeer => "too_many_streams_per_peer",
            Refusal::MessageTooLarge => "message_too_large",
            Refusal::StreamError => "stream_error",
            Refusal::ClientStatsRate => "client_stats_rate",
        }
    }

    /// Why reading a request failed with `status`.
    pub fn of_read_error(status: &tonic::Status) -> Refusal {
        match status.code() {
            // tonic's answer to a message over the decoding limit.
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => Refusal::MessageTooLarge,
            _ => Refusal::StreamError,
        }
    }
}
