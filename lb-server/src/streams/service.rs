//! A gRPC service with one bidirectional streaming method, as tonic's
//! router takes it: BalanceLoad and StreamAggregatedResources are each one.
//!
//! Written out rather than generated so that the route can use
//! [`FrameCodec`]: the generated service would encode every response on
//! every stream with 8 KiB buffers. Everything else is what tonic's
//! generated code does: one route, UNIMPLEMENTED for any other method.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::Stream;
use tonic::body::Body;
use tonic::server::{Grpc, NamedService};
use tonic::{Request, Response, Status, Streaming};

use super::codec::FrameCodec;

/// What a stream writes: encoded responses.
pub type ResponseStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

/// The one method of a [`StreamingService`].
pub trait StreamingMethod: Send + Sync + 'static {
    /// The service's full name, e.g. `grpc.lb.v1.LoadBalancer`.
    const SERVICE: &'static str;
    /// The method's path, e.g. `/grpc.lb.v1.LoadBalancer/BalanceLoad`.
    const PATH: &'static str;
    /// What clients send.
    type Request: prost::Message + Default + Send + 'static;

    /// Accepts one call and returns what it will write.
    fn call(
        self: Arc<Self>,
        request: Request<Streaming<Self::Request>>,
    ) -> impl Future<Output = Result<Response<ResponseStream>, Status>> + Send;
}

/// The service, ready for `tonic::transport::Server::add_service`.
pub struct StreamingService<M> {
    method: Arc<M>,
    max_decoding_message_size: usize,
    max_encoding_message_size: usize,
}

impl<M> Clone for StreamingService<M> {
    fn clone(&self) -> Self {
        StreamingService {
            method: self.method.clone(),
            max_decoding_message_size: self.max_decoding_message_size,
            max_encoding_message_size: self.max_encoding_message_size,
        }
    }
}

impl<M: StreamingMethod> StreamingService<M> {
    /// Serves `method`, refusing requests over `max_decoding` bytes and
    /// never writing a message over `max_encoding`.
    pub fn new(method: Arc<M>, max_decoding: usize, max_encoding: usize) -> Self {
        StreamingService {
            method,
            max_decoding_message_size: max_decoding,
            max_encoding_message_size: max_encoding,
        }
    }
}

impl<M: StreamingMethod> NamedService for StreamingService<M> {
    const NAME: &'static str = M::SERVICE;
}

impl<M: StreamingMethod> tower::Service<http::Request<Body>> for StreamingService<M> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != M::PATH {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let route = Route(self.method.clone());
        let mut grpc = Grpc::new(FrameCodec::<M::Request>::default())
            .apply_max_message_size_config(
                Some(self.max_decoding_message_size),
                Some(self.max_encoding_message_size),
            );
        Box::pin(async move { Ok(grpc.streaming(route, req).await) })
    }
}

/// One call, as tonic's streaming server calls it.
struct Route<M>(Arc<M>);

impl<M: StreamingMethod> tower::Service<Request<Streaming<M::Request>>> for Route<M> {
    type Response = Response<ResponseStream>;
    type Error = Status;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Status>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Streaming<M::Request>>) -> Self::Future {
        let method = self.0.clone();
        Box::pin(async move { method.call(request).await })
    }
}
