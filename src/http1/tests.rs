//! The body decoder, fed whole and a byte at a time.

use bytes::BytesMut;

use super::{Decoded, Decoder, Framing};

/// Decodes `input` fed in pieces of `step` bytes: the body, and what was
/// left in the buffer after it (a pipelined message).
fn decode(framing: Framing, input: &[u8], step: usize) -> Result<(Vec<u8>, Vec<u8>), String> {
    let mut decoder = Decoder::new(framing);
    let mut buf = BytesMut::new();
    let mut body = Vec::new();
    let mut fed = 0;
    loop {
        match decoder.decode(&mut buf).map_err(|e| e.to_string())? {
            Decoded::Data(d) => body.extend_from_slice(&d),
            Decoded::Done => return Ok((body, [&buf[..], &input[fed..]].concat())),
            Decoded::NeedMore if fed < input.len() => {
                let end = (fed + step).min(input.len());
                buf.extend_from_slice(&input[fed..end]);
                fed = end;
            }
            Decoded::NeedMore => {
                decoder.eof().map_err(|e| e.to_string())?;
            }
        }
    }
}

fn every_step(framing: Framing, input: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
    let whole = decode(framing, input, input.len().max(1));
    for step in 1..input.len().max(1) {
        assert_eq!(decode(framing, input, step), whole, "fed {step} bytes at a time");
    }
    whole
}

#[test]
fn chunked_with_extensions_and_trailers() {
    let input = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\nGET / HTTP/1.1\r\n";
    let (body, rest) = every_step(Framing::Chunked, input).expect("valid chunked body");
    assert_eq!(body, b"hello world");
    assert_eq!(rest, b"GET / HTTP/1.1\r\n");
}

#[test]
fn chunked_without_trailers() {
    let (body, rest) = every_step(Framing::Chunked, b"3\r\nabc\r\n0\r\n\r\n").expect("valid");
    assert_eq!(body, b"abc");
    assert!(rest.is_empty());
}

#[test]
fn bad_chunked_bodies_are_errors() {
    for (case, input) in [
        ("size not hex", &b"zz\r\nhello\r\n0\r\n\r\n"[..]),
        ("data longer than its size", b"3\r\nabcdef\r\n0\r\n\r\n"),
        ("size overflow", b"fffffffffffffffff\r\n"),
        ("negative size", b"-1\r\n"),
        // Read as the last chunk by lax parsers.
        ("no size digits", b"\r\n\r\n"),
        ("only an extension", b";x\r\n\r\n"),
        ("only a space", b" \r\n\r\n"),
        ("bare LF ending the size line", b"5\nhello\r\n0\r\n\r\n"),
        ("bare LF inside an extension", b"1;a\nb\r\nX\r\n0\r\n\r\n"),
        ("bare LF ending the trailers", b"0\r\n\n"),
        ("bare LF after a trailer", b"0\r\nX-T: 1\n\r\n"),
        ("a trailer line without a colon", b"0\r\nnot a field\r\n\r\n"),
    ] {
        assert!(decode(Framing::Chunked, input, input.len()).is_err(), "{case}: accepted");
    }
}

#[test]
fn a_chunked_body_cut_short_is_an_error() {
    assert!(decode(Framing::Chunked, b"5\r\nhel", 8).is_err());
}

#[test]
fn length_stops_at_the_length() {
    let (body, rest) = every_step(Framing::Length(5), b"helloGET").expect("valid");
    assert_eq!(body, b"hello");
    assert_eq!(rest, b"GET");
    assert!(decode(Framing::Length(5), b"hel", 3).is_err(), "a short body ended cleanly");
}

#[test]
fn close_delimited_runs_to_the_end() {
    let (body, _) = every_step(Framing::Close, b"all of it").expect("valid");
    assert_eq!(body, b"all of it");
}

#[test]
fn semantics_refuse_conflicting_lengths() {
    let mut headers = hyper::HeaderMap::new();
    headers.append("content-length", "5".parse().expect("value"));
    headers.append("content-length", "6".parse().expect("value"));
    assert!(super::semantics(&headers).is_err());
    let mut same = hyper::HeaderMap::new();
    same.append("content-length", "5".parse().expect("value"));
    same.append("content-length", "5, 5".parse().expect("value"));
    assert_eq!(super::semantics(&same).expect("agreeing lengths").content_length, Some(5));
    let mut signed = hyper::HeaderMap::new();
    signed.append("content-length", "+5".parse().expect("value"));
    assert!(super::semantics(&signed).is_err());
}

#[test]
fn transfer_codings_other_than_chunked_alone_are_told_apart() {
    for (value, only, last) in [
        ("chunked", true, true),
        ("gzip, chunked", false, true),
        ("chunked, gzip", false, false),
        ("Chunked", true, true),
    ] {
        let mut headers = hyper::HeaderMap::new();
        headers.append("transfer-encoding", value.parse().expect("value"));
        let s = super::semantics(&headers).expect("semantics");
        assert_eq!((s.chunked_only, s.chunked_last), (only, last), "{value}");
    }
}

#[test]
fn chunk_sizes_are_lowercase_hex() {
    let mut out = Vec::new();
    super::write_chunk_size(&mut out, 0x1a2f);
    assert_eq!(out, b"1a2f\r\n");
}

#[test]
fn chunk_sizes_allow_spaces_and_extensions() {
    let (body, _) = every_step(Framing::Chunked, b"5 ;name=\"v\"\t;x\r\nhello\r\n0\r\n\r\n").expect("valid");
    assert_eq!(body, b"hello");
    let (body, _) = every_step(Framing::Chunked, b"000000000000000A\r\n0123456789\r\n0\r\n\r\n").expect("16 digits");
    assert_eq!(body, b"0123456789");
}

#[test]
fn the_rest_of_a_body_is_found_in_the_buffer_without_consuming_it() {
    assert!(Decoder::new(Framing::Length(5)).rest_is_in(b"hello"));
    assert!(!Decoder::new(Framing::Length(5)).rest_is_in(b"hell"));
    assert!(Decoder::new(Framing::Chunked).rest_is_in(b"5\r\nhello\r\n0\r\n\r\n"));
    assert!(!Decoder::new(Framing::Chunked).rest_is_in(b"5\r\nhello\r\n0\r\n"));
    assert!(!Decoder::new(Framing::Chunked).rest_is_in(b"zz\r\n"));
    assert!(Decoder::new(Framing::Empty).rest_is_in(b""));
}

/// Chunked bodies with random bytes overwritten, dropped or added, fed
/// whole and in small pieces: each is decoded or refused, the same either
/// way, and nothing panics.
#[test]
fn mangled_chunked_bodies_decode_or_fail_alike() {
    const BODY: &[u8] = b"5;ext=1\r\nhello\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: t\r\n\r\n";
    const BYTES: &[u8] = b"\r\n ;=0123456789abcdefABCDEFxX\t\0\x80\xff";
    let mut rand = crate::testrand::Rand::new(0xD1B5_4A32_D192_ED03);
    for _ in 0..20_000 {
        let mut input = BODY.to_vec();
        rand.mangle(&mut input, BYTES, 3);
        let whole = decode(Framing::Chunked, &input, input.len());
        let step = 1 + rand.below(7);
        assert_eq!(
            decode(Framing::Chunked, &input, step),
            whole,
            "{:?} fed {step} bytes at a time",
            String::from_utf8_lossy(&input)
        );
    }
}
