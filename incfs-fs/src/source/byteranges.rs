//! Answers to multi-range requests (RFC 9110 §14.6): a `multipart/byteranges` body parsed as
//! it streams in, and its parts mapped back onto the ranges asked for.
//!
//! A server may answer the ranges in any order, coalesce neighbours into one part (with the
//! gap between them) or send them all as one `206` part, so nothing here assumes a part per
//! range: every byte of every part is placed by its offset in the image. What a part may
//! hold is bounded by the ranges asked for (it must lie between the first one's start and
//! the last one's end, each range's bytes must come in order and once), so a confused or
//! hostile server costs at most the span of the request, never wrong bytes.

use std::ops::ControlFlow;

use super::http::parse_content_range;

/// Most ranges asked for in one multi-range request: 64 ranges keep the `Range` header near
/// 1.5 KB, well under the 8 KB header limit of common servers (nginx, Go's net/http).
pub(super) const MAX_RANGES_PER_REQUEST: usize = 64;

/// Longest run of text (boundary line, part headers) accepted between two part bodies.
const MAX_TEXT: usize = 8 * 1024;

/// Places the bytes of an answer onto the ranges asked for.
pub(super) struct Demux<'a> {
    ranges: &'a [(u64, u64)],
    /// Bytes handed over per range (each comes in order from its start).
    delivered: Vec<u64>,
    /// First byte of the first range and end of the last: no part may leave this span.
    span: (u64, u64),
    /// Bytes of parts received so far, gaps included; at most the span's length.
    received: u64,
    /// Parts begun so far; at most one per range.
    parts: usize,
    image_len: u64,
}

impl<'a> Demux<'a> {
    /// For `ranges` (non-empty, ascending, apart, none empty) of an image of `image_len`
    /// bytes; `Err` names what is wrong with them.
    pub(super) fn new(ranges: &'a [(u64, u64)], image_len: u64) -> Result<Self, String> {
        let (Some(first), Some(last)) = (ranges.first(), ranges.last()) else {
            return Err("no ranges".into());
        };
        for w in ranges.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                return Err(format!(
                    "ranges {}+{} and {}+{} are not ascending and apart",
                    w[0].0, w[0].1, w[1].0, w[1].1
                ));
            }
        }
        if ranges.iter().any(|r| r.1 == 0) {
            return Err("an empty range".into());
        }
        Ok(Demux {
            ranges,
            delivered: vec![0; ranges.len()],
            span: (first.0, last.0 + last.1),
            received: 0,
            parts: 0,
            image_len,
        })
    }

    /// A part of bytes `first..=last` of an image of `total` bytes begins.
    pub(super) fn begin_part(
        &mut self,
        first: u64,
        last: u64,
        total: Option<u64>,
    ) -> Result<(), String> {
        self.parts += 1;
        if self.parts > self.ranges.len() {
            return Err(format!(
                "more parts than the {} ranges asked for",
                self.ranges.len()
            ));
        }
        if total.is_some_and(|t| t != self.image_len) {
            return Err(format!(
                "a part names an image of {} bytes, not {}",
                total.unwrap_or_default(),
                self.image_len
            ));
        }
        if first < self.span.0 || last >= self.span.1 {
            return Err(format!(
                "a part of bytes {first}-{last} lies outside the ranges asked for ({}..{})",
                self.span.0, self.span.1
            ));
        }
        Ok(())
    }

    /// Bytes `data` of the image at `offset`, from within a part: hands each asked range
    /// its share.
    pub(super) fn deliver(
        &mut self,
        offset: u64,
        data: &[u8],
        on_piece: &mut dyn FnMut(usize, &[u8]) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, String> {
        self.received += data.len() as u64;
        if self.received > self.span.1 - self.span.0 {
            return Err("more bytes than the ranges asked for span".into());
        }
        let end = offset + data.len() as u64;
        let mut i = self.ranges.partition_point(|r| r.0 + r.1 <= offset);
        while let Some(&(start, len)) = self.ranges.get(i) {
            if start >= end {
                break;
            }
            let from = offset.max(start);
            let to = end.min(start + len);
            if from != start + self.delivered[i] {
                return Err(format!(
                    "bytes from {from} of the range {start}+{len} came out of order or twice"
                ));
            }
            self.delivered[i] += to - from;
            let piece = &data[(from - offset) as usize..(to - offset) as usize];
            if on_piece(i, piece).is_break() {
                return Ok(ControlFlow::Break(()));
            }
            i += 1;
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Bytes of the asked ranges handed over, and asked for.
    pub(super) fn progress(&self) -> (u64, u64) {
        (
            self.delivered.iter().sum(),
            self.ranges.iter().map(|r| r.1).sum(),
        )
    }
}

/// Where a `multipart/byteranges` body is.
enum State {
    /// Before a boundary line (the preamble, or the line break after a part's body).
    Boundary,
    /// In a part's header lines.
    Headers,
    /// In a part's body: its next byte is the image's byte `at`; `left` bytes remain.
    Body { at: u64, left: u64 },
    /// After the closing boundary.
    Done,
}

/// A streaming parser of a `multipart/byteranges` body.
pub(super) struct Multipart {
    /// `--` and the boundary.
    delimiter: Vec<u8>,
    state: State,
    /// Text not yet parsed (never body bytes).
    text: Vec<u8>,
}

impl Multipart {
    /// For a `Content-Type` header; `None` unless it is `multipart/byteranges` with a
    /// boundary.
    pub(super) fn for_content_type(content_type: &str) -> Option<Self> {
        let mut params = content_type.split(';');
        if !params
            .next()?
            .trim()
            .eq_ignore_ascii_case("multipart/byteranges")
        {
            return None;
        }
        let boundary = params.find_map(|p| {
            let (k, v) = p.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case("boundary")
                .then(|| v.trim().trim_matches('"').to_string())
        })?;
        if boundary.is_empty() || boundary.len() > 70 {
            return None;
        }
        Some(Multipart {
            delimiter: format!("--{boundary}").into_bytes(),
            state: State::Boundary,
            text: Vec::new(),
        })
    }

    /// True after the closing boundary.
    pub(super) fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Parses the next bytes of the body, handing part bytes to `demux`.
    pub(super) fn feed(
        &mut self,
        mut data: &[u8],
        demux: &mut Demux<'_>,
        on_piece: &mut dyn FnMut(usize, &[u8]) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, String> {
        loop {
            match self.state {
                State::Done => return Ok(ControlFlow::Continue(())),
                State::Body { at, left } => {
                    let n = (left as usize).min(data.len());
                    if n > 0 && demux.deliver(at, &data[..n], on_piece)?.is_break() {
                        return Ok(ControlFlow::Break(()));
                    }
                    data = &data[n..];
                    self.state = if left == n as u64 {
                        State::Boundary
                    } else {
                        State::Body {
                            at: at + n as u64,
                            left: left - n as u64,
                        }
                    };
                    if data.is_empty() {
                        return Ok(ControlFlow::Continue(()));
                    }
                }
                State::Boundary => {
                    self.text.extend_from_slice(data);
                    data = &[];
                    let Some(pos) = find(&self.text, &self.delimiter) else {
                        if self.text.len() > MAX_TEXT {
                            return Err("no boundary line where one was due".into());
                        }
                        return Ok(ControlFlow::Continue(()));
                    };
                    let after = pos + self.delimiter.len();
                    if self.text.len() < after + 2 {
                        return Ok(ControlFlow::Continue(()));
                    }
                    if &self.text[after..after + 2] == b"--" {
                        self.state = State::Done;
                        self.text.clear();
                        return Ok(ControlFlow::Continue(()));
                    }
                    self.text.drain(..after);
                    self.state = State::Headers;
                }
                State::Headers => {
                    self.text.extend_from_slice(data);
                    let Some(end) = find(&self.text, b"\r\n\r\n") else {
                        if self.text.len() > MAX_TEXT {
                            return Err("a part's headers do not end".into());
                        }
                        return Ok(ControlFlow::Continue(()));
                    };
                    let (first, last, total) = part_range(&self.text[..end])?;
                    demux.begin_part(first, last, total)?;
                    let rest = self.text.split_off(end + 4);
                    self.text.clear();
                    self.state = State::Body {
                        at: first,
                        left: last - first + 1,
                    };
                    return self.feed(&rest, demux, on_piece);
                }
            }
        }
    }
}

/// The body of a `206` answer to a multi-range request, as it is read: a multipart body, or
/// one part (the server coalesced every range into one).
enum Answer {
    Parts(Multipart),
    One { at: u64 },
}

impl Answer {
    /// For a `206` answer with these headers; a single part is begun in `demux` at once.
    fn new(headers: &reqwest::header::HeaderMap, demux: &mut Demux<'_>) -> Result<Self, String> {
        let header = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let ct = header(reqwest::header::CONTENT_TYPE);
        if let Some(mp) = Multipart::for_content_type(&ct) {
            return Ok(Answer::Parts(mp));
        }
        let cr = header(reqwest::header::CONTENT_RANGE);
        let (first, last, total) =
            parse_content_range(&cr).ok_or_else(|| format!("206 with Content-Range {cr:?}"))?;
        demux.begin_part(first, last, total)?;
        Ok(Answer::One { at: first })
    }

    /// The next bytes of the body.
    pub(super) fn feed(
        &mut self,
        piece: &[u8],
        demux: &mut Demux<'_>,
        on_piece: &mut dyn FnMut(usize, &[u8]) -> ControlFlow<()>,
    ) -> Result<ControlFlow<()>, String> {
        match self {
            Answer::Parts(mp) => mp.feed(piece, demux, on_piece),
            Answer::One { at } => {
                let flow = demux.deliver(*at, piece, on_piece);
                *at += piece.len() as u64;
                flow
            }
        }
    }

    /// At the end of the body: `Err((got, want))` unless every range came whole.
    pub(super) fn finish(&self, demux: &Demux<'_>) -> Result<(), (u64, u64)> {
        let (got, want) = demux.progress();
        let closed = match self {
            Answer::Parts(mp) => mp.is_done(),
            Answer::One { .. } => true,
        };
        if got == want && closed {
            Ok(())
        } else {
            Err((got, want))
        }
    }
}

/// Whether a source still asks for several ranges in one request: until its server answers
/// such a request with the whole file (as RFC 9110 allows, and S3 does).
#[derive(Debug)]
pub(super) struct MultiRange(std::sync::atomic::AtomicBool);

impl MultiRange {
    pub(super) fn new() -> Self {
        MultiRange(std::sync::atomic::AtomicBool::new(true))
    }

    /// [`super::Source::ranges_per_request`].
    pub(super) fn per_request(&self) -> usize {
        if self.0.load(std::sync::atomic::Ordering::Relaxed) {
            MAX_RANGES_PER_REQUEST
        } else {
            1
        }
    }

    /// True when `ranges` should go in one request.
    pub(super) fn wanted(&self, ranges: &[(u64, u64)]) -> bool {
        ranges.len() > 1 && self.per_request() > 1
    }

    /// The server answered a multi-range request of `source` (sent at `started`) with the
    /// whole file, which the caller has dropped unread: ranges one at a time from now on,
    /// starting with these, within what is left of `timeout`.
    pub(super) fn refused<S: super::Source + ?Sized>(
        &self,
        source: &S,
        ranges: &[(u64, u64)],
        kind: super::RequestKind,
        timeout: std::time::Duration,
        started: std::time::Instant,
        on_piece: &mut dyn FnMut(usize, &[u8]) -> ControlFlow<()>,
    ) -> Result<(), super::SourceError> {
        self.0.store(false, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(source = %source.describe(), "the server answers multi-range requests with the whole file; asking for one range at a time");
        let left = timeout.saturating_sub(started.elapsed());
        super::read_ranges_one_by_one(source, ranges, kind, left, on_piece)
    }
}

/// The error of a multi-range request for `ranges` answered with HTTP `status`.
pub(super) fn status_error(name: &str, ranges: &[(u64, u64)], status: u16) -> super::SourceError {
    let last = ranges[ranges.len() - 1];
    super::SourceError::Status {
        source_name: name.to_owned(),
        status,
        offset: ranges[0].0,
        end: last.0 + last.1,
    }
}

/// Checks ranges a source is asked for in one call: each within the image, and (for a
/// multi-range request) ascending, apart and none empty.
pub(super) fn check_ranges(
    name: &str,
    ranges: &[(u64, u64)],
    image_len: u64,
) -> Result<(), super::SourceError> {
    for &(offset, len) in ranges {
        super::check_range(name, offset, len, image_len)?;
    }
    if ranges.len() > 1 {
        Demux::new(ranges, image_len)
            .map_err(|e| super::SourceError::Unusable(format!("{name}: {e}")))?;
    }
    Ok(())
}

/// Reads the `206` answer (its `headers`, then its body from `next`) of a multi-range request
/// for `ranges` of an image of `image_len` bytes, handing each range's bytes to `on_piece`;
/// `name` is the source's, for errors.
pub(super) fn read_answer(
    name: &str,
    image_len: u64,
    ranges: &[(u64, u64)],
    headers: &reqwest::header::HeaderMap,
    next: &mut dyn FnMut() -> Result<Option<bytes::Bytes>, super::SourceError>,
    on_piece: &mut dyn FnMut(usize, &[u8]) -> ControlFlow<()>,
) -> Result<(), super::SourceError> {
    use super::SourceError;
    let mut demux =
        Demux::new(ranges, image_len).map_err(|e| SourceError::Unusable(format!("{name}: {e}")))?;
    let bad = |what: String| SourceError::Io {
        source_name: name.to_string(),
        error: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("multi-range answer: {what}"),
        ),
    };
    let mut answer = Answer::new(headers, &mut demux).map_err(bad)?;
    while let Some(piece) = next()? {
        if answer
            .feed(&piece, &mut demux, on_piece)
            .map_err(bad)?
            .is_break()
        {
            return Ok(());
        }
    }
    answer
        .finish(&demux)
        .map_err(|(got, want)| SourceError::Short {
            source_name: name.to_string(),
            got,
            want,
        })
}

/// The `Range` header value asking for `ranges` (offset, length).
pub(super) fn range_header(ranges: &[(u64, u64)]) -> String {
    let spec: Vec<String> = ranges
        .iter()
        .map(|&(o, l)| format!("{o}-{}", o + l - 1))
        .collect();
    format!("bytes={}", spec.join(","))
}

/// The `Content-Range` of a part's header lines.
fn part_range(head: &[u8]) -> Result<(u64, u64, Option<u64>), String> {
    let head = String::from_utf8_lossy(head);
    let value = head
        .split("\r\n")
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("content-range")
                .then_some(value)
        })
        .ok_or("a part without a Content-Range")?;
    parse_content_range(value).ok_or_else(|| format!("a part with Content-Range {value:?}"))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `body` to a parser in pieces of `step` bytes; returns each range's bytes.
    fn parse(ranges: &[(u64, u64)], body: &[u8], step: usize) -> Result<Vec<Vec<u8>>, String> {
        let mut mp = Multipart::for_content_type("multipart/byteranges; boundary=\"XyZ\"")
            .ok_or("content type")?;
        let mut demux = Demux::new(ranges, 1000)?;
        let mut out = vec![Vec::new(); ranges.len()];
        for piece in body.chunks(step) {
            let flow = mp.feed(piece, &mut demux, &mut |i, p| {
                out[i].extend_from_slice(p);
                ControlFlow::Continue(())
            })?;
            assert!(flow.is_continue());
        }
        assert!(mp.is_done());
        Ok(out)
    }

    fn part(first: u64, data: &[u8]) -> Vec<u8> {
        let last = first + data.len() as u64 - 1;
        let mut v = format!(
            "\r\n--XyZ\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {first}-{last}/1000\r\n\r\n"
        )
        .into_bytes();
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn parts_in_any_order_and_coalesced_reach_their_ranges() {
        let ranges = [(10, 3), (20, 2), (30, 4)];
        // The last range first; the first two coalesced with the gap between them.
        let mut body = part(30, b"wxyz");
        body.extend(part(10, b"abc.......de"));
        body.extend_from_slice(b"\r\n--XyZ--\r\n");
        for step in [1, 2, 7, 1000] {
            let out = parse(&ranges, &body, step).unwrap();
            assert_eq!(out, vec![b"abc".to_vec(), b"de".to_vec(), b"wxyz".to_vec()]);
        }
    }

    #[test]
    fn bad_answers_are_errors() {
        let ranges = [(10, 3), (20, 2)];
        let close = b"\r\n--XyZ--\r\n";
        // A part outside the asked span.
        let mut body = part(5, b"abc");
        body.extend_from_slice(close);
        assert!(parse(&ranges, &body, 3).unwrap_err().contains("outside"));
        // The same range twice.
        let mut body = part(10, b"abc");
        body.extend(part(10, b"abc"));
        assert!(parse(&ranges, &body, 3).is_err());
        // A part without its Content-Range.
        let body = b"--XyZ\r\nContent-Type: x\r\n\r\nabc".to_vec();
        assert!(
            parse(&ranges, &body, 3)
                .unwrap_err()
                .contains("Content-Range")
        );
        // Another image's length.
        let body = b"--XyZ\r\nContent-Range: bytes 10-12/999\r\n\r\nabc".to_vec();
        assert!(parse(&ranges, &body, 3).unwrap_err().contains("999"));
        // Ranges that overlap are refused up front.
        assert!(Demux::new(&[(10, 5), (12, 2)], 1000).is_err());
        assert!(Multipart::for_content_type("application/octet-stream").is_none());
    }
}
