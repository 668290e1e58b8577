//! Building blocks of the targets' inputs: hostile scalars, JSON and TOML text, and byte-level
//! mutation of real inputs.

use arbitrary::{Result, Unstructured};

/// Integers at the edges of the types the parsers read into.
pub const EDGE_INTS: &[i64] = &[
    0,
    1,
    -1,
    2,
    -2,
    -100,
    100,
    255,
    256,
    65_535,
    65_536,
    i32::MAX as i64,
    i32::MIN as i64,
    u32::MAX as i64,
    1 << 32,
    1 << 44,
    1 << 53,
    (1 << 53) + 1,
    1 << 62,
    i64::MAX,
    i64::MIN,
    i64::MAX - 1,
    i64::MIN + 1,
];

/// Valid JSON number texts that parsers have opinions on (edges of i64, u64, f32, f64).
const JSON_NUMBERS: &[&str] = &[
    "0",
    "-0",
    "0.0",
    "-0.0",
    "1",
    "-1",
    "1.5",
    "-1e-6",
    "1e-6",
    "1.0000001e-6",
    "1e308",
    "-1e308",
    "1.7976931348623157e308",
    "1e309",
    "-1e309",
    "1e-320",
    "5e-324",
    "-1e300",
    "1e300",
    "3.4028236e38",
    "1e39",
    "-1e39",
    "1e-46",
    "9007199254740993",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "-9223372036854775809",
    "18446744073709551615",
    "18446744073709551616",
    "340282366920938463463374607431768211456",
    "1E2",
    "1e+2",
];

/// Number-like texts that are not JSON.
const NOT_JSON_NUMBERS: &[&str] = &[
    "NaN",
    "nan",
    "Infinity",
    "-Infinity",
    "inf",
    "01",
    "+1",
    ".5",
    "1.",
    "0x10",
    "1e",
    "-",
    "1_000",
];

/// True about once in `n` calls; false once the bytes run out (`ratio` would then say yes
/// every time, making every exhausted input hostile).
pub fn rare(u: &mut Unstructured, n: u32) -> Result<bool> {
    if u.is_empty() {
        return Ok(false);
    }
    u.ratio(1, n)
}

/// Integers: mostly small, sometimes at an edge, sometimes anything.
pub fn int(u: &mut Unstructured) -> Result<i64> {
    Ok(match u.int_in_range(0..=9u8)? {
        0 | 1 => *u.choose(EDGE_INTS)?,
        2 => u.arbitrary()?,
        _ => u.int_in_range(-3..=300)?,
    })
}

/// An integer's text: [`int`], or past `i64` (TOML and JSON read those into u64, or fail).
pub fn int_text(u: &mut Unstructured) -> Result<String> {
    const WIDE: &[&str] = &["9223372036854775808", "18446744073709551615", "18446744073709551616"];
    if rare(u, 6)? {
        return Ok((*u.choose(WIDE)?).to_string());
    }
    Ok(int(u)?.to_string())
}

/// Floats, including non-finite ones and the edges of f32 and f64.
pub fn float(u: &mut Unstructured) -> Result<f64> {
    const EDGES: &[f64] = &[
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        1e-6,
        -1e-6,
        1e-300,
        1e300,
        -1e300,
        1e308,
        -1e308,
        f64::MAX,
        f64::MIN,
        f64::MIN_POSITIVE,
        5e-324,
        1e-46,
        3.5e38,
        -3.5e38,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ];
    Ok(match u.int_in_range(0..=5u8)? {
        0 | 1 => *u.choose(EDGES)?,
        2 => u.arbitrary()?,
        _ => f64::from(u.int_in_range(-4000..=4000i32)?) / 1000.0,
    })
}

/// A short string: plain, empty, long, with escapes, or arbitrary Unicode.
pub fn string(u: &mut Unstructured) -> Result<String> {
    const PICKS: &[&str] = &[
        "",
        " ",
        "a",
        "cpu",
        "cuda",
        "cuda:0",
        "cuda:99999999999999999999",
        "http://127.0.0.1:8000",
        "localhost:8000",
        "0-3,28-31",
        "3-1",
        "-1",
        "\u{0}",
        "\u{feff}",
        "\u{10ffff}",
        "\"",
        "\\",
        "\n",
        "{",
        "}",
        "{port:api}",
        "{port:}",
        "{nope}",
        "{run}",
        "..",
        "/",
        "/dev/zero",
    ];
    Ok(match u.int_in_range(0..=5u8)? {
        0 | 1 => (*u.choose(PICKS)?).to_string(),
        2 => "x".repeat(u.int_in_range(0..=3000usize)?),
        _ => {
            let s: String = u.arbitrary()?;
            s.chars().take(64).collect()
        }
    })
}

/// Appends a JSON string literal of `s` (escaped).
pub fn json_str(out: &mut String, s: &str) {
    out.push_str(&serde_json::Value::from(s).to_string());
}

/// Appends a JSON number: mostly a plain one from `int`/`float`, sometimes an edge text.
pub fn json_number(u: &mut Unstructured, out: &mut String) -> Result<()> {
    match u.int_in_range(0..=3u8)? {
        0 => out.push_str(u.choose(JSON_NUMBERS)?),
        1 => {
            let x = float(u)?;
            out.push_str(&serde_json::Number::from_f64(x).map_or_else(|| "1e999".to_string(), |n| n.to_string()));
        }
        _ => out.push_str(&int_text(u)?),
    }
    Ok(())
}

/// Appends a number that JSON does not allow (`NaN`, `+1`, `0x10`, ...).
pub fn not_json_number(u: &mut Unstructured, out: &mut String) -> Result<()> {
    out.push_str(u.choose(NOT_JSON_NUMBERS)?);
    Ok(())
}

/// Appends brackets nested `depth` deep (around the serde_json recursion limit of 128, or
/// well past it).
pub fn json_deep(u: &mut Unstructured, out: &mut String) -> Result<()> {
    let depth = *u.choose(&[2usize, 64, 126, 127, 128, 129, 300, 5000])?;
    let object = u.arbitrary::<bool>()?;
    for _ in 0..depth {
        out.push_str(if object { "{\"a\":" } else { "[" });
    }
    out.push('1');
    for _ in 0..depth {
        out.push(if object { '}' } else { ']' });
    }
    Ok(())
}

/// Appends any JSON value (sometimes not quite JSON), at most `depth` levels of containers.
pub fn json_value(u: &mut Unstructured, out: &mut String, depth: u32) -> Result<()> {
    let pick = if depth == 0 {
        u.int_in_range(0..=3u8)?
    } else {
        u.int_in_range(0..=6u8)?
    };
    match pick {
        0 if rare(u, 8)? => not_json_number(u, out)?,
        0 => json_number(u, out)?,
        1 => json_str(out, &string(u)?),
        2 => out.push_str(u.choose(&["true", "false", "null"])?),
        3 => out.push_str(&int(u)?.to_string()),
        4 => json_list(u, out, 0..=4, |u, out| json_value(u, out, depth - 1))?,
        5 => {
            out.push('{');
            let n = u.int_in_range(0..=3usize)?;
            for i in 0..n {
                if i > 0 {
                    out.push(',');
                }
                json_str(out, &string(u)?);
                out.push(':');
                json_value(u, out, depth - 1)?;
            }
            out.push('}');
        }
        _ if rare(u, 3)? => json_deep(u, out)?,
        _ => json_number(u, out)?,
    }
    Ok(())
}

/// Appends `[a, b, ...]` with a length in `len` and each item from `item`.
pub fn json_list(
    u: &mut Unstructured,
    out: &mut String,
    len: std::ops::RangeInclusive<usize>,
    mut item: impl FnMut(&mut Unstructured, &mut String) -> Result<()>,
) -> Result<()> {
    let n = u.int_in_range(len)?;
    out.push('[');
    for i in 0..n {
        if i > 0 {
            out.push(',');
        }
        item(u, out)?;
    }
    out.push(']');
    Ok(())
}

/// TOML value texts at the edges of the format.
const TOML_TEXTS: &[&str] = &[
    "nan",
    "+inf",
    "-inf",
    "-0.0",
    "1e308",
    "1e309",
    "5e-324",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "0x7fffffffffffffff",
    "0o777",
    "0b101",
    "1_000",
    "1979-05-27T07:32:00Z",
    "07:32:00",
    "1979-05-27",
    "true",
    "false",
    "''",
    "'''a\nb'''",
    "\"\"\"\n\"\"\"",
    "\"\\u0000\"",
    "\"\\uD800\"",
    "\"\\x\"",
    "{}",
    "[]",
];

/// Appends a TOML value: edge integers and floats (`nan`, `inf`), strings, booleans, dates,
/// arrays, inline tables, deep nesting.
pub fn toml_value(u: &mut Unstructured, out: &mut String, depth: u32) -> Result<()> {
    let pick = if depth == 0 {
        u.int_in_range(0..=4u8)?
    } else {
        u.int_in_range(0..=7u8)?
    };
    match pick {
        0 => out.push_str(u.choose(TOML_TEXTS)?),
        1 | 2 => out.push_str(&int_text(u)?),
        3 => toml_float(u, out)?,
        4 => toml_str(out, &string(u)?),
        5 => {
            out.push('[');
            let n = u.int_in_range(0..=4usize)?;
            for i in 0..n {
                if i > 0 {
                    out.push_str(", ");
                }
                toml_value(u, out, depth - 1)?;
            }
            out.push(']');
        }
        6 => {
            out.push('{');
            let n = u.int_in_range(0..=3usize)?;
            for i in 0..n {
                out.push_str(if i > 0 { ", " } else { " " });
                out.push_str(u.choose(&["a", "b", "name", "\"k k\"", "a.b"])?);
                out.push_str(" = ");
                toml_value(u, out, depth - 1)?;
            }
            out.push_str(" }");
        }
        _ => {
            let n = *u.choose(&[2usize, 100, 127, 128, 129, 300, 5000])?;
            out.push_str(&"[".repeat(n));
            out.push('1');
            out.push_str(&"]".repeat(n));
        }
    }
    Ok(())
}

/// Appends a TOML float (always with a fraction or exponent, so it stays a float).
pub fn toml_float(u: &mut Unstructured, out: &mut String) -> Result<()> {
    let x = float(u)?;
    let text = if x.is_nan() {
        "nan".to_string()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.to_string()
    } else {
        format!("{x:e}")
    };
    out.push_str(&text);
    Ok(())
}

/// Appends a TOML basic string of `s` (escaped).
pub fn toml_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Returns `seed` with 1 to 8 byte-level mutations: bit flips, edge bytes, deletions,
/// duplications, truncation, and inserted tokens from `dictionary`.
pub fn mutate(u: &mut Unstructured, seed: &[u8], dictionary: &[&str]) -> Result<Vec<u8>> {
    let mut out = seed.to_vec();
    let rounds = u.int_in_range(1..=8u8)?;
    for _ in 0..rounds {
        let len = out.len();
        let at = if len == 0 { 0 } else { u.int_in_range(0..=len - 1)? };
        match u.int_in_range(0..=7u8)? {
            0 if len > 0 => out[at] ^= 1 << u.int_in_range(0..=7u8)?,
            1 if len > 0 => out[at] = *u.choose(b"\0\x7f\x80\xff\"\\{}[],:-.0123456789eE ")?,
            2 if len > 0 => {
                let n = u.int_in_range(1..=(len - at).min(32))?;
                out.drain(at..at + n);
            }
            3 if len > 0 => {
                let n = u.int_in_range(1..=(len - at).min(64))?;
                let piece = out[at..at + n].to_vec();
                out.splice(at..at, piece);
            }
            4 => out.truncate(at),
            5 => {
                let bytes: Vec<u8> = (0..u.int_in_range(1..=8usize)?)
                    .map(|_| u.arbitrary::<u8>())
                    .collect::<Result<_>>()?;
                out.splice(at..at, bytes);
            }
            _ if !dictionary.is_empty() => {
                let token = u.choose(dictionary)?.as_bytes().to_vec();
                out.splice(at..at, token);
            }
            _ => {}
        }
    }
    Ok(out)
}

/// JSON tokens for [`mutate`].
pub const JSON_DICTIONARY: &[&str] = &[
    "null",
    "true",
    "false",
    "[",
    "]",
    "{",
    "}",
    "\"",
    ",",
    ":",
    "-",
    "1e308",
    "NaN",
    "-1",
    "-100",
    "1e309",
    "0.5",
    "[]",
    "{}",
    "\"tokens\"",
    "\"masks\"",
    "\"scores\"",
    "\"batch\"",
    "\\u0000",
    "\\ud800",
    "9999999999999999999",
];

/// TOML tokens for [`mutate`].
pub const TOML_DICTIONARY: &[&str] = &[
    "=",
    "[",
    "]",
    "[[",
    "]]",
    "\"",
    "'",
    "\n",
    "#",
    ".",
    ",",
    "{",
    "}",
    "nan",
    "inf",
    "-",
    "9223372036854775808",
    "true",
    "\n[[process]]\n",
    "\nmain = true\n",
    "{port:",
    "}",
    "\"\"\"",
    "\\u0000",
];
