use super::*;

const MAX: usize = 8192;

const CONFLICT: &[u8] = b"GET /c HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";

/// Feeds `input` whole, one byte per call, and split in two at every
/// position; every way must find `conflict` and end in the same state.
fn check(input: &[u8], conflict: Option<u64>) -> FramingScanner {
    let mut whole = FramingScanner::new(MAX);
    whole.feed(input);
    assert_eq!(whole.conflict(), conflict, "whole");

    let mut bytewise = FramingScanner::new(MAX);
    for byte in input {
        bytewise.feed(std::slice::from_ref(byte));
    }
    assert_eq!(bytewise.conflict(), conflict, "byte by byte");
    assert_eq!((bytewise.heads, bytewise.state), (whole.heads, whole.state), "byte by byte");

    for at in 0..=input.len() {
        let (first, second) = input.split_at(at);
        let mut split = FramingScanner::new(MAX);
        split.feed(first);
        split.feed(second);
        assert_eq!(split.conflict(), conflict, "split at {at}");
        assert_eq!((split.heads, split.state), (whole.heads, whole.state), "split at {at}");
    }
    whole
}

fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[test]
fn plain_get() {
    let scanner = check(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None);
    assert_eq!(scanner.heads, 1);
    assert_eq!(scanner.state, State::Head);
    assert!(scanner.partial.is_empty());
}

#[test]
fn pipelined_gets() {
    let scanner = check(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n", None);
    assert_eq!(scanner.heads, 2);
    assert!(!scanner.is_done());
}

#[test]
fn leading_empty_lines_are_skipped() {
    assert_eq!(check(b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", None).heads, 1);
    assert_eq!(check(b"\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", None).heads, 1);
    // Some clients end a body with a stray CRLF.
    let input = join(&[b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok\r\n", CONFLICT]);
    assert_eq!(check(&input, Some(1)).heads, 2);
}

#[test]
fn content_length_body_is_skipped() {
    let scanner =
        check(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nHost: x\r\n\r\n", None);
    assert_eq!(scanner.heads, 2);
    assert_eq!(scanner.state, State::Head);
}

#[test]
fn a_body_that_looks_like_a_conflicting_head_is_still_a_body() {
    let head = format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", CONFLICT.len());
    let input = join(&[head.as_bytes(), CONFLICT, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]);
    let scanner = check(&input, None);
    assert_eq!(scanner.heads, 2);
    assert!(!scanner.is_done());
}

#[test]
fn chunked_body_with_extensions_and_trailers() {
    let input = join(&[
        b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"5;name=value\r\nhello\r\n",
        // Ten bytes of data that would end the body if misread as framing.
        b"A ; ext=\"q\"\r\n0\r\n\r\nGET /\r\n",
        b"0\r\nExpires: never\r\nX-Check: 1\r\n\r\n",
        CONFLICT,
    ]);
    let scanner = check(&input, Some(1));
    assert_eq!(scanner.heads, 2);
    assert!(scanner.is_done());
}

#[test]
fn chunked_body_without_trailers_then_get() {
    let input =
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n";
    let scanner = check(input, None);
    assert_eq!(scanner.heads, 2);
    assert_eq!(scanner.state, State::Head);
}

#[test]
fn both_headers_in_either_order() {
    let cl_first = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    let te_first = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n";
    let lower = b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 3\r\n\r\n";
    let odd_case = b"POST / HTTP/1.1\r\nHost: x\r\nCONTENT-LENGTH: 3\r\nTransfer-Encoding:  Chunked \r\n\r\n";
    // hyper does not parse a length after Transfer-Encoding, so an
    // invalid one does not make it refuse the request.
    let invalid_after = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: +3\r\n\r\n";
    let inputs: [&[u8]; 5] = [cl_first, te_first, lower, odd_case, invalid_after];
    for input in inputs {
        let scanner = check(input, Some(0));
        assert!(scanner.is_done());
    }
}

#[test]
fn classic_smuggling() {
    let input = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 45\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut scanner = check(input, Some(0));
    assert_eq!(scanner.heads, 1);
    // Only the first conflict counts; later bytes are not scanned.
    scanner.feed(CONFLICT);
    assert_eq!((scanner.conflict(), scanner.heads), (Some(0), 1));
}

#[test]
fn heads_hyper_refuses_stop_without_a_conflict() {
    let refused: [&[u8]; 5] = [
        // Transfer-Encoding on HTTP/1.0.
        b"POST / HTTP/1.0\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        // Transfer-Encoding whose last coding is not chunked.
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\nContent-Length: 1\r\n\r\n",
        // Differing lengths, seen before Transfer-Encoding.
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
        // Invalid length, seen before Transfer-Encoding.
        b"POST / HTTP/1.1\r\nContent-Length: +1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ];
    for input in refused {
        let scanner = check(input, None);
        assert!(scanner.is_done());
    }
    assert!(check(b"POST / HTTP/1.1\r\nContent-Length: 18446744073709551614\r\n\r\n", None).is_done());
}

#[test]
fn repeated_equal_lengths_are_one_length() {
    let input = join(&[b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", CONFLICT]);
    assert_eq!(check(&input, Some(1)).heads, 2);
}

#[test]
fn upgrade_and_connect_stop_the_scanner() {
    let upgrade =
        join(&[b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", CONFLICT]);
    let connect = join(&[b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", CONFLICT]);
    for input in [upgrade, connect] {
        let scanner = check(&input, None);
        assert_eq!(scanner.heads, 1);
        assert!(scanner.is_done());
    }
}

#[test]
fn http2_preface_and_garbage_stop_the_scanner() {
    let preface = join(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"\x00\x00\x12\x04\x00\x00\x00\x00\x00", CONFLICT]);
    let tls_hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n";
    let bad_header = join(&[b"GET / HTTP/1.1\r\nBad Header\r\n\r\n", CONFLICT]);
    let bad_line = b"hello\r\n\r\n";
    let lone_cr = b"\r\rGET / HTTP/1.1\r\n\r\n";
    let inputs: [&[u8]; 5] = [&preface, tls_hello, &bad_header, bad_line, lone_cr];
    for input in inputs {
        let scanner = check(input, None);
        assert_eq!(scanner.heads, 0);
        assert!(scanner.is_done());
    }
}

#[test]
fn too_many_headers_stop_the_scanner() {
    let mut input = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..=MAX_HEADERS {
        input.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
    }
    input.extend_from_slice(b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
    let mut scanner = FramingScanner::new(MAX);
    scanner.feed(&input);
    assert_eq!(scanner.conflict(), None);
    assert!(scanner.is_done());
}

#[test]
fn a_split_head_over_the_limit_is_given_up() {
    let max = 64;
    let input = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        "a".repeat(100)
    );
    let input = input.as_bytes();

    let mut bytewise = FramingScanner::new(max);
    for byte in input {
        bytewise.feed(std::slice::from_ref(byte));
    }
    assert_eq!(bytewise.conflict(), None);
    assert!(bytewise.is_done());
    assert_eq!(bytewise.partial.capacity(), 0, "the buffer is released");

    for at in 1..input.len() {
        let (first, second) = input.split_at(at);
        let mut split = FramingScanner::new(max);
        split.feed(first);
        split.feed(second);
        assert_eq!(split.conflict(), None, "split at {at}");
        assert!(split.is_done(), "split at {at}");
    }
}

#[test]
fn bad_chunks_stop_the_scanner() {
    let head: &[u8] = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    let bad: [&[u8]; 8] = [
        b"zz\r\n",
        b";ext\r\n",
        // 2^64: overflows.
        b"10000000000000000\r\n",
        // hyper wants CRLF after the size, never a bare LF.
        b"5\nhello\r\n0\r\n\r\n",
        b"5;a\nhello\r\n0\r\n\r\n",
        b"5 5\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloX\r\n0\r\n\r\n",
        b"0\r\n\r\r",
    ];
    for chunk in bad {
        let scanner = check(&join(&[head, chunk, CONFLICT]), None);
        assert_eq!(scanner.heads, 1);
        assert!(scanner.is_done());
    }
}

#[test]
fn leading_zeros_in_a_chunk_size_are_fine() {
    // More than 16 hex digits, but no overflow: hyper accepts it.
    let input = join(&[
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"00000000000000000005\r\nhello\r\n0\r\n\r\n",
        CONFLICT,
    ]);
    assert_eq!(check(&input, Some(1)).heads, 2);
}

#[test]
fn feeding_after_done_changes_nothing() {
    let mut scanner = FramingScanner::new(MAX);
    scanner.feed(CONFLICT);
    assert_eq!(scanner.conflict(), Some(0));
    scanner.feed(b"GET / HTTP/1.1\r\n\r\n");
    scanner.feed(CONFLICT);
    assert_eq!((scanner.conflict(), scanner.heads, scanner.state), (Some(0), 1, State::Done));
}

#[test]
fn framing_counts_requests() {
    let framing = Framing::new();
    framing.record(1);
    let seen: Vec<bool> = (0..3).map(|_| framing.next_request_is_ambiguous()).collect();
    assert_eq!(seen, [false, true, false]);

    let clean = Framing::new();
    assert!((0..3).all(|_| !clean.next_request_is_ambiguous()));
}

#[tokio::test]
async fn scanned_io_publishes_the_conflict() {
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    let request = join(&[b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", CONFLICT, b"0\r\n\r\n"]);
    let response = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
    // A tiny pipe, so that the request arrives in many short reads.
    let (mut client, server) = duplex(7);
    let (mut io, framing) = ScannedIo::new(server, MAX);

    let client_side = async {
        client.write_all(&request).await.expect("write request");
        client.shutdown().await.expect("shutdown client");
        let mut received = Vec::new();
        client.read_to_end(&mut received).await.expect("read response");
        received
    };
    let server_side = async {
        let mut received = Vec::new();
        io.read_to_end(&mut received).await.expect("read request");
        io.write_all(response).await.expect("write response");
        io.shutdown().await.expect("shutdown server");
        received
    };
    let (to_client, to_server) = tokio::join!(client_side, server_side);

    assert_eq!(to_server, request, "bytes pass through unchanged");
    assert_eq!(to_client, response);
    assert!(!framing.next_request_is_ambiguous());
    assert!(framing.next_request_is_ambiguous());
    assert!(!framing.next_request_is_ambiguous());
}
