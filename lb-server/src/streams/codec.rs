//! The codec of the LB's streaming frontends: requests are decoded with
//! prost; responses are already encoded (a snapshot's bytes, shared by
//! every stream on it, or a response assembled from cached resources) and
//! only copied into the gRPC frame.
//!
//! Buffers start small. A server list or an assignment is a few hundred
//! bytes and a stream is idle nearly all its life, so tonic's default of
//! 8 KiB per direction and stream would be most of an idle stream's
//! memory; a larger message simply grows the buffer for that write.

use std::marker::PhantomData;

use bytes::{BufMut, Bytes};
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::Status;
use tonic_prost::ProstDecoder;

/// Starting size of a stream's encode and decode buffers.
const BUFFER_SIZE: usize = 256;
/// Encoded bytes gathered before they are handed to HTTP/2 (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

/// Decodes requests of type `Req`, writes pre-encoded responses.
#[derive(Debug)]
pub struct FrameCodec<Req>(PhantomData<fn() -> Req>);

impl<Req> Default for FrameCodec<Req> {
    fn default() -> Self {
        FrameCodec(PhantomData)
    }
}

impl<Req: prost::Message + Default + Send + 'static> Codec for FrameCodec<Req> {
    type Encode = Bytes;
    type Decode = Req;
    type Encoder = FrameEncoder;
    type Decoder = ProstDecoder<Req>;

    fn encoder(&mut self) -> FrameEncoder {
        FrameEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}

/// Copies an encoded message into the frame.
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameEncoder;

impl Encoder for FrameEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}
