//! The codec of every Flotilla gRPC server: prost encoding, with a request
//! that cannot be decoded answered INVALID_ARGUMENT naming the field.
//!
//! Design notes: tonic-prost answers an undecodable message with INTERNAL
//! ("failed to decode Protobuf message"), which tells the caller the server
//! broke when it was the caller's bytes (a string that is not UTF-8, a
//! truncated field). The generated servers use [`RequestCodec`] (see
//! `build.rs`); the generated clients keep tonic-prost's codec, because
//! for a client an undecodable *response* is the server's fault and stays
//! INTERNAL — a caller that retries INTERNAL but not INVALID_ARGUMENT must
//! not be told its own request was bad.

use std::marker::PhantomData;

use prost::{DecodeError, Message};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// prost encoding; a request that does not decode is INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct RequestCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for RequestCodec<T, U> {
    fn default() -> Self {
        RequestCodec(PhantomData)
    }
}

impl<T, U> Codec for RequestCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> ProstEncoder<T> {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> RequestDecoder<U> {
        RequestDecoder(PhantomData)
    }
}

/// Decodes a request; see [`decode_status`] for its refusal.
#[derive(Debug, Clone)]
pub struct RequestDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| decode_status(&e))
    }
}

/// INVALID_ARGUMENT `<field path>: cannot be decoded: <why>`, the field
/// path as the request nests it (`pool.name`, not prost's innermost-first
/// `Pool.name: CreatePoolRequest.pool`). prost keeps its location stack
/// private, so it is read back from its `Display`, which is
/// `failed to decode Protobuf message: {Msg.field: }*{description}`.
pub fn decode_status(e: &DecodeError) -> Status {
    let text = e.to_string();
    let mut rest = text
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(&text);
    let mut fields = Vec::new();
    while let Some((head, tail)) = rest.split_once(": ") {
        match head.split_once('.') {
            Some((msg, field)) if is_ident(msg) && is_ident(field) => {
                fields.push(field);
                rest = tail;
            }
            _ => break,
        }
    }
    fields.reverse();
    let path = if fields.is_empty() {
        "request".to_owned()
    } else {
        fields.join(".")
    };
    Status::invalid_argument(format!("{path}: cannot be decoded: {rest}"))
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1;

    /// Bytes of a message whose field `tag` (length-delimited) holds `value`.
    fn field(tag: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![(tag << 3) | 2, value.len() as u8];
        out.extend_from_slice(value);
        out
    }

    #[test]
    fn a_string_that_is_not_utf8_is_invalid_argument_naming_its_field() {
        let e = v1::GetInstanceRequest::decode(&field(1, b"\xff\xfe")[..]).expect_err("not utf-8");
        let s = decode_status(&e);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "id: cannot be decoded: invalid string value: data is not UTF-8 encoded"
        );
    }

    #[test]
    fn a_nested_field_is_named_by_its_path_from_the_request() {
        // CreatePoolRequest.pool (1) = Pool { name (1) = <not UTF-8> }.
        let bytes = field(1, &field(1, b"a\xffb"));
        let e = v1::CreatePoolRequest::decode(&bytes[..]).expect_err("not utf-8");
        let s = decode_status(&e);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(
            s.message().starts_with("pool.name: cannot be decoded: "),
            "{}",
            s.message()
        );
    }

    #[test]
    fn bytes_that_are_no_message_at_all_name_the_request() {
        let e = v1::GetInstanceRequest::decode(&[0xff, 0xff, 0xff][..]).expect_err("garbage");
        let s = decode_status(&e);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(
            s.message().starts_with("request: cannot be decoded: "),
            "{}",
            s.message()
        );
    }
}
