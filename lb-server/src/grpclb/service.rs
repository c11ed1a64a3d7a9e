//! The `grpc.lb.v1.LoadBalancer` service as tonic's router takes it.
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

use futures::future::BoxFuture;
use lb_proto::grpc::lb::v1::LoadBalanceRequest;
use tonic::body::Body;
use tonic::server::{Grpc, NamedService};
use tonic::{Request, Response, Status, Streaming};

use super::codec::FrameCodec;
use super::{Balancer, ResponseStream};

/// The one method's path.
const BALANCE_LOAD: &str = "/grpc.lb.v1.LoadBalancer/BalanceLoad";

/// The LoadBalancer service, ready for `tonic::transport::Server::add_service`.
#[derive(Clone)]
pub struct LoadBalancerService {
    balancer: Arc<Balancer>,
    max_decoding_message_size: usize,
    max_encoding_message_size: usize,
}

impl LoadBalancerService {
    /// Serves `balancer`, refusing requests over `max_decoding` bytes and
    /// never writing a message over `max_encoding`.
    pub fn new(balancer: Balancer, max_decoding: usize, max_encoding: usize) -> Self {
        LoadBalancerService {
            balancer: Arc::new(balancer),
            max_decoding_message_size: max_decoding,
            max_encoding_message_size: max_encoding,
        }
    }
}

impl NamedService for LoadBalancerService {
    const NAME: &'static str = "grpc.lb.v1.LoadBalancer";
}

impl tower::Service<http::Request<Body>> for LoadBalancerService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != BALANCE_LOAD {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let route = Route(self.balancer.clone());
        let mut grpc = Grpc::new(FrameCodec).apply_max_message_size_config(
            Some(self.max_decoding_message_size),
            Some(self.max_encoding_message_size),
        );
        Box::pin(async move { Ok(grpc.streaming(route, req).await) })
    }
}

/// One call of BalanceLoad, as tonic's streaming server calls it.
struct Route(Arc<Balancer>);

impl tower::Service<Request<Streaming<LoadBalanceRequest>>> for Route {
    type Response = Response<ResponseStream>;
    type Error = Status;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Status>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Streaming<LoadBalanceRequest>>) -> Self::Future {
        let balancer = self.0.clone();
        Box::pin(async move { balancer.balance_load(request).await })
    }
}
