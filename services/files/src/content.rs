//! What a file is, decided from its bytes as they stream past: magic numbers for the
//! binary types, UTF-8 for `text/plain`, and a real JSON parse for `application/json`.
//! The client's declared type is only checked against the result.

use std::fmt;

/// Most bytes the magic numbers need.
const HEAD: usize = 8;

/// The content types Penny accepts (the guide's allowlist).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    /// `image/jpeg`
    Jpeg,
    /// `image/png`
    Png,
    /// `image/gif`
    Gif,
    /// `application/pdf`
    Pdf,
    /// `text/plain` (valid UTF-8)
    Text,
    /// `application/json` (parses)
    Json,
}

impl ContentType {
    /// Every allowed type.
    pub const ALL: [Self; 6] = [
        Self::Jpeg,
        Self::Png,
        Self::Gif,
        Self::Pdf,
        Self::Text,
        Self::Json,
    ];

    /// The MIME type.
    pub fn mime(self) -> &'static str {
        match self {
            Self::Jpeg => "image/jpeg",
            Self::Png => "image/png",
            Self::Gif => "image/gif",
            Self::Pdf => "application/pdf",
            Self::Text => "text/plain",
            Self::Json => "application/json",
        }
    }

    /// The extension of stored objects.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Jpeg => "jpg",
            Self::Png => "png",
            Self::Gif => "gif",
            Self::Pdf => "pdf",
            Self::Text => "txt",
            Self::Json => "json",
        }
    }

    /// The type of a MIME string (exact, lower case; parameters such as `; charset=utf-8`
    /// are not accepted).
    pub fn parse(mime: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.mime() == mime)
    }

    /// The binary type whose magic number `head` starts with.
    fn from_magic(head: &[u8]) -> Option<Self> {
        if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(Self::Jpeg)
        } else if head.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(Self::Png)
        } else if head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a") {
            Some(Self::Gif)
        } else if head.starts_with(b"%PDF-") {
            Some(Self::Pdf)
        } else {
            None
        }
    }
}

impl fmt::Display for ContentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.mime())
    }
}

/// Why a file's content is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentRefusal {
    /// No bytes.
    Empty,
    /// The bytes are of no allowed type (binary without a known magic number).
    NotAllowed,
    /// The bytes are an allowed type, but not the one declared.
    Mismatch {
        /// What the bytes are.
        detected: ContentType,
    },
    /// Declared JSON, and the text does not parse.
    NotJson,
}

/// Decides a file's type while its bytes go past, in constant memory.
#[derive(Debug)]
pub struct Sniffer {
    declared: ContentType,
    /// The first bytes, until the magic numbers can be checked.
    head: Vec<u8>,
    /// The binary type, once known.
    magic: Option<ContentType>,
    /// Whether the magic check is done.
    decided: bool,
    /// While no magic number matched: whether the bytes so far are UTF-8.
    utf8: Utf8Check,
    /// While declared JSON: the parser, fed as bytes arrive.
    json: Option<JsonCheck>,
    total: u64,
}

impl Sniffer {
    /// A sniffer for a file declared as `declared`.
    pub fn new(declared: ContentType) -> Self {
        Self {
            declared,
            head: Vec::with_capacity(HEAD),
            magic: None,
            decided: false,
            utf8: Utf8Check::default(),
            json: (declared == ContentType::Json).then(JsonCheck::default),
            total: 0,
        }
    }

    /// The next bytes of the file.
    pub fn update(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        if self.decided {
            self.text(bytes);
            return;
        }
        let take = (HEAD - self.head.len()).min(bytes.len());
        self.head.extend_from_slice(&bytes[..take]);
        if self.head.len() == HEAD {
            self.decide();
            self.text(&bytes[take..]);
        }
    }

    fn decide(&mut self) {
        self.decided = true;
        self.magic = ContentType::from_magic(&self.head);
        let head = std::mem::take(&mut self.head);
        self.text(&head);
    }

    fn text(&mut self, bytes: &[u8]) {
        if self.magic.is_some() || bytes.is_empty() {
            return;
        }
        self.utf8.update(bytes);
        if let Some(json) = &mut self.json {
            json.update(bytes);
        }
    }

    /// The type, once every byte went past.
    pub fn finish(mut self) -> Result<ContentType, ContentRefusal> {
        if self.total == 0 {
            return Err(ContentRefusal::Empty);
        }
        if !self.decided {
            self.decide();
        }
        let detected = match self.magic {
            Some(binary) => binary,
            None if !self.utf8.finish() => return Err(ContentRefusal::NotAllowed),
            None if self.declared == ContentType::Json => {
                if self.json.is_some_and(JsonCheck::finish) {
                    ContentType::Json
                } else {
                    return Err(ContentRefusal::NotJson);
                }
            }
            None => ContentType::Text,
        };
        if detected == self.declared {
            Ok(detected)
        } else {
            Err(ContentRefusal::Mismatch { detected })
        }
    }
}

/// UTF-8 validation across chunk boundaries, and no control characters.
#[derive(Debug, Default)]
struct Utf8Check {
    /// The start of a character cut by the chunk boundary (at most 3 bytes).
    carry: Vec<u8>,
    invalid: bool,
}

impl Utf8Check {
    fn update(&mut self, mut bytes: &[u8]) {
        if self.invalid {
            return;
        }
        // Text holds no NUL or other control characters but tab, line feed, form feed and
        // carriage return (these bytes are never part of a multi-byte character): a binary
        // file cannot pass as text for being ASCII.
        if bytes
            .iter()
            .any(|&b| (b < 0x20 && !matches!(b, b'\t' | b'\n' | 0x0c | b'\r')) || b == 0x7f)
        {
            self.invalid = true;
            return;
        }
        // Complete the character the last chunk cut, one byte at a time.
        while !self.carry.is_empty() && !bytes.is_empty() {
            self.carry.push(bytes[0]);
            bytes = &bytes[1..];
            match std::str::from_utf8(&self.carry) {
                Ok(_) => self.carry.clear(),
                Err(e) if e.error_len().is_some() => {
                    self.invalid = true;
                    return;
                }
                Err(_) => {}
            }
        }
        if !self.carry.is_empty() {
            return;
        }
        match std::str::from_utf8(bytes) {
            Ok(_) => {}
            Err(e) if e.error_len().is_some() => self.invalid = true,
            Err(e) => self.carry.extend_from_slice(&bytes[e.valid_up_to()..]),
        }
    }

    fn finish(&self) -> bool {
        !self.invalid && self.carry.is_empty()
    }
}

/// A JSON syntax check fed in pieces: an RFC 8259 text (one value, any type, surrounded by
/// whitespace). Nesting is bounded by [`MAX_DEPTH`]; deeper documents are refused. A `\u`
/// escape of a UTF-16 surrogate must be half of a pair (`"\ud83e\udd80"`): a lone one
/// names no character, and serde_json refuses it too.
#[derive(Debug, Default)]
struct JsonCheck {
    /// Open containers: `b'{'` or `b'['`.
    stack: Vec<u8>,
    state: JsonState,
    /// Inside a literal (`true`, `false`, `null`): what is left of it.
    literal: &'static [u8],
    /// Inside a `\u` escape: hex digits left.
    hex_left: u8,
    /// Inside a `\u` escape: the code unit so far.
    code_unit: u16,
    /// Where in a surrogate pair.
    surrogate: Surrogate,
    /// Inside a number: where in its grammar.
    number: NumberState,
    failed: bool,
}

/// Deepest nesting accepted (serde_json's own default limit).
pub const MAX_DEPTH: usize = 128;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum JsonState {
    /// Before the top-level value, or after `[`, `:` or `,` in an array: a value must come.
    #[default]
    Value,
    /// After `[`: a value or `]`.
    ValueOrEnd,
    /// After `{` : a key or `}`.
    KeyOrEnd,
    /// After `,` in an object: a key.
    Key,
    /// In a string (a key when `key`).
    String { key: bool },
    /// After `\` in a string.
    Escape { key: bool },
    /// After a key: `:`.
    Colon,
    /// After a value: `,`, a closer, or the end.
    AfterValue,
    /// In a literal.
    Literal,
    /// In a number.
    Number,
    /// After the top-level value: only whitespace.
    Done,
}

/// Where a string is in a `\u` surrogate pair.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Surrogate {
    /// Not in one.
    #[default]
    None,
    /// After a high surrogate's escape: `\` must follow.
    High,
    /// After the `\`: `u` must follow.
    Backslash,
    /// In the low surrogate's escape.
    Low,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum NumberState {
    /// After `-`.
    #[default]
    Minus,
    /// After a leading `0`.
    Zero,
    /// In the integer digits.
    Int,
    /// After `.`.
    Dot,
    /// In the fraction digits.
    Frac,
    /// After `e`.
    Exp,
    /// After the exponent's sign.
    ExpSign,
    /// In the exponent digits.
    ExpDigits,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl JsonCheck {
    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.failed {
                return;
            }
            if !self.step(b) {
                self.failed = true;
            }
        }
    }

    /// The state after a complete value.
    fn after_value(&self) -> JsonState {
        if self.stack.is_empty() {
            JsonState::Done
        } else {
            JsonState::AfterValue
        }
    }

    fn open(&mut self, container: u8) -> bool {
        if self.stack.len() >= MAX_DEPTH {
            return false;
        }
        self.stack.push(container);
        self.state = if container == b'{' {
            JsonState::KeyOrEnd
        } else {
            JsonState::ValueOrEnd
        };
        true
    }

    fn close(&mut self, closer: u8) -> bool {
        let want = if closer == b'}' { b'{' } else { b'[' };
        if self.stack.pop() != Some(want) {
            return false;
        }
        self.state = self.after_value();
        true
    }

    fn start_value(&mut self, b: u8) -> bool {
        match b {
            b'{' | b'[' => self.open(b),
            b'"' => {
                self.state = JsonState::String { key: false };
                true
            }
            b't' => self.start_literal(b"rue"),
            b'f' => self.start_literal(b"alse"),
            b'n' => self.start_literal(b"ull"),
            b'-' => {
                self.state = JsonState::Number;
                self.number = NumberState::Minus;
                true
            }
            b'0' => {
                self.state = JsonState::Number;
                self.number = NumberState::Zero;
                true
            }
            b'1'..=b'9' => {
                self.state = JsonState::Number;
                self.number = NumberState::Int;
                true
            }
            _ => false,
        }
    }

    fn start_literal(&mut self, rest: &'static [u8]) -> bool {
        self.state = JsonState::Literal;
        self.literal = rest;
        true
    }

    /// Whether a number may end in its current state.
    fn number_complete(&self) -> bool {
        matches!(
            self.number,
            NumberState::Zero | NumberState::Int | NumberState::Frac | NumberState::ExpDigits
        )
    }

    /// One hex digit of a `\u` escape; after the fourth, whether the code unit may stand
    /// where it is.
    fn hex_digit(&mut self, b: u8) -> bool {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return false,
        };
        self.hex_left -= 1;
        // Four digits: at most 0xFFFF, so the shift loses nothing.
        self.code_unit = (self.code_unit << 4) | u16::from(digit);
        if self.hex_left > 0 {
            return true;
        }
        let high = (0xD800..=0xDBFF).contains(&self.code_unit);
        let low = (0xDC00..=0xDFFF).contains(&self.code_unit);
        match self.surrogate {
            Surrogate::Low => {
                self.surrogate = Surrogate::None;
                low
            }
            _ if high => {
                self.surrogate = Surrogate::High;
                true
            }
            _ => !low,
        }
    }

    fn step(&mut self, b: u8) -> bool {
        use JsonState as S;
        match self.state {
            S::Value => is_ws(b) || self.start_value(b),
            S::ValueOrEnd => is_ws(b) || (b == b']' && self.close(b)) || self.start_value(b),
            S::KeyOrEnd | S::Key => {
                if is_ws(b) {
                    true
                } else if b == b'"' {
                    self.state = S::String { key: true };
                    true
                } else {
                    self.state == S::KeyOrEnd && b == b'}' && self.close(b)
                }
            }
            S::String { key } => {
                if self.hex_left > 0 {
                    return self.hex_digit(b);
                }
                if self.surrogate == Surrogate::High {
                    if b != b'\\' {
                        return false;
                    }
                    self.surrogate = Surrogate::Backslash;
                    self.state = S::Escape { key };
                    return true;
                }
                match b {
                    b'"' => {
                        self.state = if key { S::Colon } else { self.after_value() };
                        true
                    }
                    b'\\' => {
                        self.state = S::Escape { key };
                        true
                    }
                    // Control characters must be escaped; the UTF-8 check covers the rest.
                    0x00..=0x1F => false,
                    _ => true,
                }
            }
            S::Escape { key } => {
                self.state = S::String { key };
                if self.surrogate == Surrogate::Backslash {
                    self.surrogate = Surrogate::Low;
                    self.hex_left = 4;
                    self.code_unit = 0;
                    return b == b'u';
                }
                match b {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => true,
                    b'u' => {
                        self.hex_left = 4;
                        self.code_unit = 0;
                        true
                    }
                    _ => false,
                }
            }
            S::Colon => {
                if is_ws(b) {
                    true
                } else if b == b':' {
                    self.state = S::Value;
                    true
                } else {
                    false
                }
            }
            S::AfterValue => match b {
                _ if is_ws(b) => true,
                b',' => {
                    self.state = if self.stack.last() == Some(&b'{') {
                        S::Key
                    } else {
                        S::Value
                    };
                    true
                }
                b'}' | b']' => self.close(b),
                _ => false,
            },
            S::Literal => match self.literal.split_first() {
                Some((&want, rest)) if want == b => {
                    self.literal = rest;
                    if rest.is_empty() {
                        self.state = self.after_value();
                    }
                    true
                }
                _ => false,
            },
            S::Number => self.number_step(b),
            S::Done => is_ws(b),
        }
    }

    fn number_step(&mut self, b: u8) -> bool {
        use NumberState as N;
        let next = match (self.number, b) {
            (N::Minus, b'0') => N::Zero,
            (N::Minus, b'1'..=b'9') => N::Int,
            (N::Int, b'0'..=b'9') => N::Int,
            (N::Zero | N::Int, b'.') => N::Dot,
            (N::Dot | N::Frac, b'0'..=b'9') => N::Frac,
            (N::Zero | N::Int | N::Frac, b'e' | b'E') => N::Exp,
            (N::Exp, b'+' | b'-') => N::ExpSign,
            (N::Exp | N::ExpSign | N::ExpDigits, b'0'..=b'9') => N::ExpDigits,
            _ => {
                // The number ends here; `b` belongs to what follows it.
                if !self.number_complete() {
                    return false;
                }
                self.state = self.after_value();
                return self.step(b);
            }
        };
        self.number = next;
        true
    }

    fn finish(self) -> bool {
        if self.failed {
            return false;
        }
        match self.state {
            JsonState::Done => true,
            JsonState::Number => self.stack.is_empty() && self.number_complete(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sniff_in(
        declared: ContentType,
        bytes: &[u8],
        chunk: usize,
    ) -> Result<ContentType, ContentRefusal> {
        let mut sniffer = Sniffer::new(declared);
        for part in bytes.chunks(chunk.max(1)) {
            sniffer.update(part);
        }
        sniffer.finish()
    }

    /// Every split of the input gives the same answer as the whole.
    fn sniff(declared: ContentType, bytes: &[u8]) -> Result<ContentType, ContentRefusal> {
        let whole = sniff_in(declared, bytes, bytes.len());
        for chunk in [1, 2, 3, 5, 7] {
            assert_eq!(sniff_in(declared, bytes, chunk), whole, "chunk {chunk}");
        }
        whole
    }

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";

    #[test]
    fn binary_types_come_from_magic_numbers() {
        assert_eq!(sniff(ContentType::Png, PNG), Ok(ContentType::Png));
        assert_eq!(
            sniff(ContentType::Jpeg, b"\xff\xd8\xff\xe0\0\x10JFIF"),
            Ok(ContentType::Jpeg)
        );
        assert_eq!(
            sniff(ContentType::Gif, b"GIF89a\x01\0\x01\0"),
            Ok(ContentType::Gif)
        );
        assert_eq!(
            sniff(ContentType::Pdf, b"%PDF-1.7\n%\xe2\xe3"),
            Ok(ContentType::Pdf)
        );
        // A PNG declared as a PDF.
        assert_eq!(
            sniff(ContentType::Pdf, PNG),
            Err(ContentRefusal::Mismatch {
                detected: ContentType::Png
            })
        );
        // An executable, whatever it claims.
        assert_eq!(
            sniff(ContentType::Png, b"\x7fELF\x02\x01\x01\0\0\0"),
            Err(ContentRefusal::NotAllowed)
        );
        assert_eq!(
            sniff(ContentType::Text, b"\x7fELF\x02\x01\x01\0\xff\xfe"),
            Err(ContentRefusal::NotAllowed)
        );
        assert_eq!(sniff(ContentType::Text, b""), Err(ContentRefusal::Empty));
    }

    #[test]
    fn text_must_be_utf8_and_json_must_parse() {
        assert_eq!(
            sniff(ContentType::Text, "héllo wörld ✓ 🦀".as_bytes()),
            Ok(ContentType::Text)
        );
        assert_eq!(sniff(ContentType::Text, b"ab"), Ok(ContentType::Text));
        assert_eq!(
            sniff(ContentType::Text, b"caf\xc3"),
            Err(ContentRefusal::NotAllowed)
        );
        assert_eq!(
            sniff(ContentType::Text, b"bad \xff byte here"),
            Err(ContentRefusal::NotAllowed)
        );
        assert_eq!(
            sniff(ContentType::Text, b"nul \0 inside"),
            Err(ContentRefusal::NotAllowed)
        );
        assert_eq!(
            sniff(ContentType::Text, b"tab\tcr\r\nff\x0c"),
            Ok(ContentType::Text)
        );
        // Text claiming to be an image.
        assert_eq!(
            sniff(ContentType::Png, b"just some words"),
            Err(ContentRefusal::Mismatch {
                detected: ContentType::Text
            })
        );
        // JSON is text too.
        assert_eq!(
            sniff(ContentType::Text, b"{\"a\": 1}"),
            Ok(ContentType::Text)
        );
        for good in [
            &b"{\"a\": [1, -2.5e+3, 0, 0.5, true, false, null, \"x\\u00e9\\n\"], \"b\": {}}"[..],
            b" [ ] ",
            b"12",
            b"\"only a string\"",
            b"{\"nested\":[[[{\"k\":\"v\"}]]]}\n",
        ] {
            assert_eq!(
                sniff(ContentType::Json, good),
                Ok(ContentType::Json),
                "{}",
                String::from_utf8_lossy(good)
            );
        }
        for bad in [
            &b"{\"a\": }"[..],
            b"{\"a\" 1}",
            b"[1, 2,]",
            b"{} {}",
            b"01",
            b"1.",
            b"-",
            b"tru",
            b"[1, 2",
            b"\"\\x\"",
            b"hello",
            b"{'a': 1}",
        ] {
            assert_eq!(
                sniff(ContentType::Json, bad),
                Err(ContentRefusal::NotJson),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // A raw control character is not text at all.
        assert_eq!(
            sniff(ContentType::Json, b"{\"a\": \"\x01\"}"),
            Err(ContentRefusal::NotAllowed)
        );
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert_eq!(
            sniff_in(ContentType::Json, deep.as_bytes(), 4096),
            Err(ContentRefusal::NotJson)
        );
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert_eq!(
            sniff_in(ContentType::Json, ok.as_bytes(), 4096),
            Ok(ContentType::Json)
        );
    }

    #[test]
    fn the_json_check_agrees_with_serde_json() {
        let samples = [
            "{\"a\":1}",
            "[1,2,3]",
            "[1,,2]",
            "{\"a\":1,}",
            "\"\\ud83e\\udd80\"",
            "\"\\uD83E\\uDD80\"",
            "\"\\ud800\"",
            "\"\\udc00\"",
            "\"\\ud800x\"",
            "\"\\ud800\\n\"",
            "\"\\ud800\\ud800\"",
            "\"\\ud800\\u0041\"",
            "\"\\udd80\\ud83e\"",
            "{\"\\ud800\":1}",
            "[\"\\u00e9\\ud83e\\udd80\\uffff\"]",
            "\"\\u12\"",
            "1e5",
            "1E-5",
            "-0",
            "-01",
            "[-]",
            "[.5]",
            "[5.]",
            "{\"a\":tru}",
            "nul",
            "[null]",
            "  {  }  ",
            "{\"\":\"\"}",
            "[\"\\/\"]",
            "[\"\\q\"]",
            "1 2",
            "[1]x",
            "{\"a\" : [ { } ] }",
        ];
        for sample in samples {
            let ours = sniff(ContentType::Json, sample.as_bytes()) == Ok(ContentType::Json);
            let theirs = serde_json::from_str::<serde_json::Value>(sample).is_ok();
            assert_eq!(ours, theirs, "{sample}");
        }
    }

    /// Pieces of JSON and near-JSON, inserted at random below.
    const PIECES: &[&str] = &[
        "{", "}", "[", "]", ":", ",", "\"", "\\", "\\u", "\\ud83e", "\\udd80", "\\uD800",
        "\\udc00", "0041", "ffff", "0", "1", "-", "+", ".", "e", "E", "true", "null", "tru", " ",
        "\n", "\t", "\u{e9}", "\u{7}", "\\n", "\\\"",
    ];

    /// Strings as JSON writes them: plain characters and every kind of escape, surrogate
    /// pairs included.
    fn json_string() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let part = prop_oneof![
            "[a-z é\u{1F980}]",
            Just("\\n".to_owned()),
            Just("\\\"".to_owned()),
            Just("\\/".to_owned()),
            "\\\\u[0-9a-cA-Ce-fE-F][0-9a-fA-F]{3}",
            Just("\\ud83e\\udd80".to_owned()),
            Just("\\uDBFF\\uDFFF".to_owned()),
        ];
        proptest::collection::vec(part, 0..6).prop_map(|parts| format!("\"{}\"", parts.concat()))
    }

    /// Valid JSON texts: nested arrays and objects of numbers, literals and strings.
    fn json_value() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            "-?(0|[1-9][0-9]{0,5})(\\.[0-9]{1,3})?([eE][+-]?[0-9]{1,2})?",
            Just("true".to_owned()),
            Just("false".to_owned()),
            Just("null".to_owned()),
            json_string(),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..5)
                    .prop_map(|items| format!("[{}]", items.join(", "))),
                proptest::collection::vec((json_string(), inner), 0..5).prop_map(|members| {
                    let members: Vec<String> = members
                        .into_iter()
                        .map(|(k, v)| format!("{k}: {v}"))
                        .collect();
                    format!("{{ {} }}", members.join(","))
                }),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// The incremental check takes a text as JSON exactly when serde_json parses it,
        /// whole or in pieces (`sniff` compares the splits): valid texts, and the same texts
        /// with a piece cut out or put in.
        #[test]
        fn json_texts_and_their_mutants_agree_with_serde_json(
            text in json_value(),
            edit in proptest::option::of((0.0..1.0f64, 0usize..4, 0..PIECES.len())),
        ) {
            let mut text = text;
            if let Some((at, cut, piece)) = edit {
                let mut at = ((text.len() as f64) * at) as usize;
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                let mut end = (at + cut).min(text.len());
                while !text.is_char_boundary(end) {
                    end += 1;
                }
                text.replace_range(at..end, if cut == 0 { PIECES[piece] } else { "" });
            }
            let ours = sniff(ContentType::Json, text.as_bytes()) == Ok(ContentType::Json);
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(_) => proptest::prop_assert!(ours, "serde_json takes {:?}", text),
                // Valid JSON text that serde_json cannot hold in an f64.
                Err(e) if e.to_string().contains("number out of range") => {}
                Err(e) => proptest::prop_assert!(!ours, "serde_json refuses {:?}: {}", text, e),
            }
        }
    }
}
