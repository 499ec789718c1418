//! JSONPath in the dialect MedTech templates are written in (Newtonsoft.Json's `SelectTokens`).
//!
//! Why our own evaluator rather than an RFC 9535 crate: MedTech templates rely on behaviour RFC 9535
//! forbids or defines differently. `$..[?(@heartRate)]` tests every node *including the root* (a
//! Newtonsoft scan filter), where RFC 9535 tests only children; `@heartRate` (no dot) is an
//! existence test; `$.['name']` puts a dot before a bracket. Translating to RFC syntax would still
//! leave the root-inclusion semantics wrong, so the subset templates use is parsed and evaluated
//! here, over borrowed `serde_json::Value`s, with nothing allocated but the result list.

use serde_json::Value;
use std::fmt;

/// A compiled JSONPath expression.
#[derive(Debug, Clone)]
pub struct JsonPath {
    segments: Vec<Segment>,
    /// Set when every segment is a plain member name (`$.a.b`), the common case, which is then
    /// walked directly without collecting intermediate node lists.
    names: Option<Vec<String>>,
}

/// Why an expression did not compile; `offset` is a character offset into the expression.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    pub offset: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at character {})", self.message, self.offset + 1)
    }
}

#[derive(Debug, Clone)]
enum Segment {
    Child(Selector),
    Descendant(Selector),
}

#[derive(Debug, Clone)]
enum Selector {
    Name(String),
    Names(Vec<String>),
    Wildcard,
    Indices(Vec<i64>),
    Slice(Option<i64>, Option<i64>, i64),
    Filter(Box<Filter>),
}

#[derive(Debug, Clone)]
enum Filter {
    Or(Vec<Filter>),
    And(Vec<Filter>),
    Not(Box<Filter>),
    Exists(Operand),
    Compare(Operand, CmpOp, Operand),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone)]
enum Operand {
    /// `@...` (relative to the tested node) or `$...` (relative to the document root).
    Path {
        from_root: bool,
        segments: Vec<Segment>,
        names: Option<Vec<String>>,
    },
    Literal(Value),
}

/// The document an expression runs against. `matched` is the CalculatedContent `matchedToken`:
/// the reference evaluates against a copy of the event with the match added as its last member;
/// we resolve that member virtually instead of copying the event for every match.
#[derive(Clone, Copy)]
pub struct Scope<'a> {
    pub root: &'a Value,
    pub matched: Option<&'a Value>,
}

pub const MATCHED_TOKEN: &str = "matchedToken";

impl JsonPath {
    pub fn parse(text: &str) -> Result<JsonPath, ParseError> {
        let mut p = Parser::new(text);
        p.skip_ws();
        if !p.eat('$') {
            return Err(p.error("a JSONPath expression starts with '$'"));
        }
        let segments = p.segments(false)?;
        p.skip_ws();
        if !p.at_end() {
            return Err(p.error("unexpected character"));
        }
        let names = plain_names(&segments);
        Ok(JsonPath { segments, names })
    }

    /// The one token selected, `Ok(None)` for none, `Err(n)` when `n > 1` tokens are selected.
    pub fn select_one<'a>(&self, scope: Scope<'a>) -> Result<Option<&'a Value>, usize> {
        if let Some(names) = &self.names {
            let mut it = names.iter();
            let start = match (it.next(), scope.matched) {
                (None, _) => return Ok(Some(scope.root)),
                (Some(first), Some(m)) if first == MATCHED_TOKEN => Some(m),
                (Some(first), _) => scope.root.get(first),
            };
            return Ok(it.try_fold(start, |v, n| v.map(|v| v.get(n))).flatten());
        }
        let mut all = self.select(scope);
        match all.len() {
            0 | 1 => Ok(all.pop()),
            n => Err(n),
        }
    }

    /// All tokens the expression selects, in document order.
    pub fn select<'a>(&self, scope: Scope<'a>) -> Vec<&'a Value> {
        let mut out = Vec::new();
        let Some((first, rest)) = self.segments.split_first() else {
            out.push(scope.root);
            return out;
        };
        let mut current = Vec::new();
        match scope.matched {
            None => apply(first, scope.root, scope.root, &mut current),
            Some(matched) => apply_virtual(first, scope.root, matched, &mut current),
        }
        for seg in rest {
            let mut next = Vec::new();
            for node in current {
                apply(seg, node, scope.root, &mut next);
            }
            current = next;
        }
        out.extend(current);
        out
    }
}

/// The first segment against the virtual root `{...event, "matchedToken": matched}`.
fn apply_virtual<'a>(seg: &Segment, root: &'a Value, matched: &'a Value, out: &mut Vec<&'a Value>) {
    match seg {
        Segment::Child(Selector::Name(n)) if n == MATCHED_TOKEN => out.push(matched),
        Segment::Child(Selector::Names(names)) => {
            for n in names {
                if n == MATCHED_TOKEN {
                    out.push(matched);
                } else if let Some(v) = root.as_object().and_then(|o| o.get(n)) {
                    out.push(v);
                }
            }
        }
        Segment::Child(Selector::Wildcard) => {
            apply(seg, root, root, out);
            out.push(matched);
        }
        Segment::Descendant(_) => {
            apply(seg, root, root, out);
            apply(seg, matched, root, out);
        }
        _ => apply(seg, root, root, out),
    }
}

fn apply<'a>(seg: &Segment, node: &'a Value, root: &'a Value, out: &mut Vec<&'a Value>) {
    match seg {
        Segment::Child(sel) => select_children(sel, node, root, out),
        Segment::Descendant(Selector::Filter(f)) => {
            // Newtonsoft's scan filter: every node, the start node included, is tested itself.
            walk(node, &mut |n| {
                if f.matches(n, root) {
                    out.push(n);
                }
            });
        }
        Segment::Descendant(sel) => walk(node, &mut |n| select_children(sel, n, root, out)),
    }
}

/// Pre-order, document-order traversal of `node` and everything below it.
fn walk<'a>(node: &'a Value, f: &mut impl FnMut(&'a Value)) {
    f(node);
    match node {
        Value::Object(map) => map.values().for_each(|v| walk(v, f)),
        Value::Array(items) => items.iter().for_each(|v| walk(v, f)),
        _ => {}
    }
}

fn select_children<'a>(sel: &Selector, node: &'a Value, root: &'a Value, out: &mut Vec<&'a Value>) {
    match (sel, node) {
        (Selector::Name(n), Value::Object(map)) => out.extend(map.get(n)),
        (Selector::Names(names), Value::Object(map)) => out.extend(names.iter().filter_map(|n| map.get(n))),
        (Selector::Wildcard, Value::Object(map)) => out.extend(map.values()),
        (Selector::Wildcard, Value::Array(items)) => out.extend(items.iter()),
        (Selector::Indices(idx), Value::Array(items)) => {
            for &i in idx {
                let i = if i < 0 { items.len() as i64 + i } else { i };
                if i >= 0 {
                    out.extend(items.get(i as usize));
                }
            }
        }
        (Selector::Slice(start, end, step), Value::Array(items)) => slice(items, *start, *end, *step, out),
        // Newtonsoft filters array elements only: iterating an object yields its properties,
        // which no filter expression matches.
        (Selector::Filter(f), Value::Array(items)) => out.extend(items.iter().filter(|v| f.matches(v, root))),
        _ => {}
    }
}

fn slice<'a>(items: &'a [Value], start: Option<i64>, end: Option<i64>, step: i64, out: &mut Vec<&'a Value>) {
    let len = items.len() as i64;
    let norm = |i: i64| if i < 0 { (len + i).max(0) } else { i.min(len) };
    if step > 0 {
        let (s, e) = (norm(start.unwrap_or(0)), norm(end.unwrap_or(len)));
        let mut i = s;
        while i < e {
            out.push(&items[i as usize]);
            // A step as large as i64 allows steps past the end by overflowing: that is the end.
            let Some(next) = i.checked_add(step) else { break };
            i = next;
        }
    } else if step < 0 {
        let s = start.map(norm).unwrap_or(len).min(len - 1);
        let e = end.map(norm).unwrap_or(-1);
        let mut i = s;
        while i > e && i >= 0 {
            out.push(&items[i as usize]);
            let Some(next) = i.checked_add(step) else { break };
            i = next;
        }
    }
}

impl Filter {
    fn matches(&self, node: &Value, root: &Value) -> bool {
        match self {
            Filter::Or(fs) => fs.iter().any(|f| f.matches(node, root)),
            Filter::And(fs) => fs.iter().all(|f| f.matches(node, root)),
            Filter::Not(f) => !f.matches(node, root),
            // An existence test: a member holding null, false or 0 still exists.
            Filter::Exists(op) => op.exists(node, root),
            Filter::Compare(l, op, r) => {
                let left = l.resolve(node, root);
                let right = r.resolve(node, root);
                left.iter().any(|a| right.iter().any(|b| compare(a, *op, b)))
            }
        }
    }
}

fn truthy(v: &Value) -> bool {
    !matches!(v, Value::Null | Value::Bool(false))
}

/// The member names of a path made only of `.name` / `['name']` segments.
fn plain_names(segments: &[Segment]) -> Option<Vec<String>> {
    segments
        .iter()
        .map(|s| match s {
            Segment::Child(Selector::Name(n)) => Some(n.clone()),
            _ => None,
        })
        .collect()
}

fn walk_names<'a>(start: &'a Value, names: &[String]) -> Option<&'a Value> {
    names.iter().try_fold(start, |v, n| v.get(n))
}

impl Operand {
    fn exists(&self, node: &Value, root: &Value) -> bool {
        match self {
            Operand::Path { from_root, names: Some(names), .. } => {
                walk_names(if *from_root { root } else { node }, names).is_some()
            }
            Operand::Path { .. } => !self.resolve(node, root).is_empty(),
            Operand::Literal(v) => truthy(v),
        }
    }

    fn resolve<'a>(&'a self, node: &'a Value, root: &'a Value) -> Vec<&'a Value> {
        let start = |from_root: bool| if from_root { root } else { node };
        match self {
            Operand::Literal(v) => vec![v],
            Operand::Path { from_root, names: Some(names), .. } => {
                walk_names(start(*from_root), names).into_iter().collect()
            }
            Operand::Path { from_root, segments, .. } => {
                let mut current = vec![start(*from_root)];
                for seg in segments {
                    let mut next = Vec::new();
                    for n in current {
                        apply(seg, n, root, &mut next);
                    }
                    current = next;
                }
                current
            }
        }
    }
}

/// Newtonsoft compares typed values: a string never equals a number; integers and floats compare
/// numerically.
fn compare(a: &Value, op: CmpOp, b: &Value) -> bool {
    use std::cmp::Ordering;
    let ord: Option<Ordering> = match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => Some(x.cmp(&y)),
            _ => x.as_f64().zip(y.as_f64()).and_then(|(x, y)| x.partial_cmp(&y)),
        },
        (Value::String(x), Value::String(y)) => Some(x.as_str().cmp(y.as_str())),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        (Value::Null, Value::Null) => Some(Ordering::Equal),
        _ => None,
    };
    match (op, ord) {
        (CmpOp::Eq, Some(o)) => o == Ordering::Equal,
        (CmpOp::Eq, None) => a == b,
        (CmpOp::Ne, Some(o)) => o != Ordering::Equal,
        (CmpOp::Ne, None) => a != b,
        (CmpOp::Lt, Some(o)) => o == Ordering::Less,
        (CmpOp::Le, Some(o)) => o != Ordering::Greater,
        (CmpOp::Gt, Some(o)) => o == Ordering::Greater,
        (CmpOp::Ge, Some(o)) => o != Ordering::Less,
        (_, None) => false,
    }
}

struct Parser<'t> {
    chars: Vec<char>,
    pos: usize,
    _text: &'t str,
    /// Filters, `!` and parentheses open at the current position.
    depth: usize,
}

/// How deep filters, negations and parentheses may nest. Parsing, evaluating and dropping a
/// filter recurse once per level, so without a bound a long enough `!!!…` or `((((…` overflows
/// the stack (2 MiB on the service's threads); no real template comes near 64.
pub const MAX_NESTING: usize = 64;

/// Characters that end an unquoted member name. Hyphens and other punctuation are allowed in names
/// (`$.SystemProperties.iothub-connection-device-id`).
fn ends_name(c: char) -> bool {
    c.is_whitespace() || matches!(c, '.' | '[' | ']' | '(' | ')' | '=' | '!' | '<' | '>' | '&' | '|' | ',' | '\'' | '"')
}

impl<'t> Parser<'t> {
    fn new(text: &'t str) -> Self {
        Parser { chars: text.chars().collect(), pos: 0, _text: text, depth: 0 }
    }
    /// One level deeper; the error is at the character that went past [`MAX_NESTING`].
    fn enter(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_NESTING {
            return Err(ParseError {
                offset: self.pos,
                message: format!("filters, '!' and parentheses nest more than {MAX_NESTING} deep"),
            });
        }
        Ok(())
    }
    fn at_end(&self) -> bool {
        self.pos >= self.chars.len()
    }
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }
    fn peek_at(&self, n: usize) -> Option<char> {
        self.chars.get(self.pos + n).copied()
    }
    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }
    fn eat_str(&mut self, s: &str) -> bool {
        let n = s.chars().count();
        if self.chars.len() >= self.pos + n && self.chars[self.pos..self.pos + n].iter().copied().eq(s.chars()) {
            self.pos += n;
            true
        } else {
            false
        }
    }
    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }
    fn error(&self, message: &str) -> ParseError {
        let found = match self.peek() {
            Some(c) => format!("{message}, found '{c}'"),
            None => format!("{message}, found the end of the expression"),
        };
        ParseError { offset: self.pos, message: found }
    }

    /// Segments after `$` or `@`. `relative` allows the `@name` shorthand (a name right after `@`).
    fn segments(&mut self, relative: bool) -> Result<Vec<Segment>, ParseError> {
        let mut segs = Vec::new();
        if relative && self.peek().is_some_and(|c| !ends_name(c)) {
            segs.push(Segment::Child(Selector::Name(self.name()?)));
        }
        loop {
            match self.peek() {
                Some('.') if self.peek_at(1) == Some('.') => {
                    self.pos += 2;
                    let sel = match self.peek() {
                        Some('[') => self.bracket()?,
                        Some('*') => {
                            self.pos += 1;
                            Selector::Wildcard
                        }
                        _ => Selector::Name(self.name()?),
                    };
                    segs.push(Segment::Descendant(sel));
                }
                Some('.') => {
                    self.pos += 1;
                    let sel = match self.peek() {
                        // Newtonsoft accepts `$.['name']`.
                        Some('[') => self.bracket()?,
                        Some('*') => {
                            self.pos += 1;
                            Selector::Wildcard
                        }
                        _ => Selector::Name(self.name()?),
                    };
                    segs.push(Segment::Child(sel));
                }
                Some('[') => segs.push(Segment::Child(self.bracket()?)),
                _ => return Ok(segs),
            }
        }
    }

    fn name(&mut self) -> Result<String, ParseError> {
        let start = self.pos;
        while self.peek().is_some_and(|c| !ends_name(c)) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error("expected a member name"));
        }
        Ok(self.chars[start..self.pos].iter().collect())
    }

    fn bracket(&mut self) -> Result<Selector, ParseError> {
        self.pos += 1; // '['
        self.skip_ws();
        let sel = match self.peek() {
            Some('?') => {
                self.pos += 1;
                self.skip_ws();
                if !self.eat('(') {
                    return Err(self.error("expected '(' after '?' in a filter"));
                }
                self.enter()?;
                let f = self.filter_or()?;
                self.depth -= 1;
                self.skip_ws();
                if !self.eat(')') {
                    return Err(self.error("expected ')' to close the filter"));
                }
                Selector::Filter(Box::new(f))
            }
            Some('*') => {
                self.pos += 1;
                Selector::Wildcard
            }
            Some('\'') | Some('"') => {
                let mut names = vec![self.quoted()?];
                self.skip_ws();
                while self.eat(',') {
                    self.skip_ws();
                    names.push(self.quoted()?);
                    self.skip_ws();
                }
                if names.len() == 1 { Selector::Name(names.pop().unwrap_or_default()) } else { Selector::Names(names) }
            }
            Some('(') => return Err(self.error("script expressions '[(...)]' are not supported")),
            _ => self.index_or_slice()?,
        };
        self.skip_ws();
        if !self.eat(']') {
            return Err(self.error("expected ']'"));
        }
        Ok(sel)
    }

    fn index_or_slice(&mut self) -> Result<Selector, ParseError> {
        let first = self.opt_int()?;
        self.skip_ws();
        if self.eat(':') {
            self.skip_ws();
            let end = self.opt_int()?;
            self.skip_ws();
            let step = if self.eat(':') {
                self.skip_ws();
                self.opt_int()?.unwrap_or(1)
            } else {
                1
            };
            if step == 0 {
                return Err(self.error("a slice step cannot be 0"));
            }
            return Ok(Selector::Slice(first, end, step));
        }
        let Some(first) = first else {
            return Err(self.error("expected an index, a slice, '*', a quoted name or a filter"));
        };
        let mut idx = vec![first];
        while self.eat(',') {
            self.skip_ws();
            match self.opt_int()? {
                Some(i) => idx.push(i),
                None => return Err(self.error("expected an index")),
            }
            self.skip_ws();
        }
        Ok(Selector::Indices(idx))
    }

    fn opt_int(&mut self) -> Result<Option<i64>, ParseError> {
        let start = self.pos;
        if self.peek() == Some('-') {
            self.pos += 1;
        }
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        if self.pos == start {
            return Ok(None);
        }
        let s: String = self.chars[start..self.pos].iter().collect();
        s.parse().map(Some).map_err(|_| ParseError { offset: start, message: format!("'{s}' is not an integer") })
    }

    fn quoted(&mut self) -> Result<String, ParseError> {
        let Some(q) = self.peek().filter(|c| *c == '\'' || *c == '"') else {
            return Err(self.error("expected a quoted string"));
        };
        let start = self.pos;
        self.pos += 1;
        let mut s = String::new();
        loop {
            match self.peek() {
                None => {
                    return Err(ParseError { offset: start, message: "unterminated string".into() });
                }
                Some('\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some(c) => {
                            s.push(match c {
                                'n' => '\n',
                                't' => '\t',
                                'r' => '\r',
                                other => other,
                            });
                            self.pos += 1;
                        }
                        None => return Err(self.error("unterminated escape")),
                    }
                }
                Some(c) if c == q => {
                    self.pos += 1;
                    return Ok(s);
                }
                Some(c) => {
                    s.push(c);
                    self.pos += 1;
                }
            }
        }
    }

    fn filter_or(&mut self) -> Result<Filter, ParseError> {
        let mut parts = vec![self.filter_and()?];
        loop {
            self.skip_ws();
            if self.eat_str("||") {
                parts.push(self.filter_and()?);
            } else {
                break;
            }
        }
        Ok(if parts.len() == 1 { parts.pop().unwrap_or(Filter::Or(vec![])) } else { Filter::Or(parts) })
    }

    fn filter_and(&mut self) -> Result<Filter, ParseError> {
        let mut parts = vec![self.filter_unary()?];
        loop {
            self.skip_ws();
            if self.eat_str("&&") {
                parts.push(self.filter_unary()?);
            } else {
                break;
            }
        }
        Ok(if parts.len() == 1 { parts.pop().unwrap_or(Filter::And(vec![])) } else { Filter::And(parts) })
    }

    fn filter_unary(&mut self) -> Result<Filter, ParseError> {
        self.skip_ws();
        if self.peek() == Some('!') && self.peek_at(1) != Some('=') {
            self.enter()?;
            self.pos += 1;
            let f = self.filter_unary()?;
            self.depth -= 1;
            return Ok(Filter::Not(Box::new(f)));
        }
        if self.peek() == Some('(') {
            self.enter()?;
            self.pos += 1;
            let f = self.filter_or()?;
            self.depth -= 1;
            self.skip_ws();
            if !self.eat(')') {
                return Err(self.error("expected ')'"));
            }
            return Ok(f);
        }
        let left = self.operand()?;
        self.skip_ws();
        let op = if self.eat_str("==") {
            CmpOp::Eq
        } else if self.eat_str("!=") {
            CmpOp::Ne
        } else if self.eat_str("<=") {
            CmpOp::Le
        } else if self.eat_str(">=") {
            CmpOp::Ge
        } else if self.eat('<') {
            CmpOp::Lt
        } else if self.eat('>') {
            CmpOp::Gt
        } else if self.peek() == Some('=') && self.peek_at(1) == Some('~') {
            return Err(self.error("regular expression filters '=~' are not supported"));
        } else {
            return Ok(Filter::Exists(left));
        };
        self.skip_ws();
        let right = self.operand()?;
        Ok(Filter::Compare(left, op, right))
    }

    fn operand(&mut self) -> Result<Operand, ParseError> {
        self.skip_ws();
        match self.peek() {
            Some(c @ ('@' | '$')) => {
                self.pos += 1;
                let segments = self.segments(c == '@')?;
                let names = plain_names(&segments);
                Ok(Operand::Path { from_root: c == '$', segments, names })
            }
            Some('\'') | Some('"') => Ok(Operand::Literal(Value::String(self.quoted()?))),
            Some(c) if c == '-' || c.is_ascii_digit() => {
                let start = self.pos;
                while self
                    .peek()
                    .is_some_and(|c| c == '-' || c == '+' || c == '.' || c == 'e' || c == 'E' || c.is_ascii_digit())
                {
                    self.pos += 1;
                }
                let s: String = self.chars[start..self.pos].iter().collect();
                serde_json::from_str::<serde_json::Number>(&s)
                    .map(|n| Operand::Literal(Value::Number(n)))
                    .map_err(|_| ParseError { offset: start, message: format!("'{s}' is not a number") })
            }
            _ if self.eat_str("true") => Ok(Operand::Literal(Value::Bool(true))),
            _ if self.eat_str("false") => Ok(Operand::Literal(Value::Bool(false))),
            _ if self.eat_str("null") => Ok(Operand::Literal(Value::Null)),
            _ => Err(self.error("expected '@', '$', a string, a number, true, false or null")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sel(expr: &str, doc: &Value) -> Vec<Value> {
        JsonPath::parse(expr)
            .unwrap_or_else(|e| panic!("{expr}: {e}"))
            .select(Scope { root: doc, matched: None })
            .into_iter()
            .cloned()
            .collect()
    }

    #[test]
    fn scan_filter_tests_the_root_too() {
        let doc = json!({"heartRate": "78", "deviceId": "d"});
        assert_eq!(sel("$..[?(@heartRate)]", &doc), vec![doc.clone()]);
    }

    #[test]
    fn scan_filter_finds_array_elements_in_document_order() {
        let doc = json!({"Body": [{"hr": 1}, {"x": {"hr": 2}}, {"hr": 3}]});
        assert_eq!(sel("$..[?(@hr)]", &doc), vec![json!({"hr": 1}), json!({"hr": 2}), json!({"hr": 3})]);
    }

    #[test]
    fn existence_is_true_for_null_false_and_zero() {
        for v in [json!(null), json!(false), json!(0)] {
            let doc = json!({"a": v});
            assert_eq!(sel("$..[?(@a)]", &doc).len(), 1);
        }
    }

    #[test]
    fn compound_filters_and_string_equality() {
        let doc = json!([{"s": 1, "d": 2}, {"s": 1}, {"unit": "inches"}, {"unit": "meters"}]);
        assert_eq!(sel("$..[?(@s && @d)]", &doc).len(), 1);
        assert_eq!(sel("$..[?(@s || @unit)]", &doc).len(), 4);
        assert_eq!(sel("$..[?(@unit == 'inches')]", &doc), vec![json!({"unit": "inches"})]);
        assert_eq!(sel("$..[?(@unit != 'inches')]", &doc), vec![json!({"unit": "meters"})]);
        assert_eq!(sel("$[?(@.s == 1)]", &doc).len(), 2);
        assert_eq!(sel("$[?(!(@s))]", &doc).len(), 2);
    }

    #[test]
    fn string_never_equals_number() {
        let doc = json!([{"hr": "60"}, {"hr": 60}, {"hr": 60.0}]);
        assert_eq!(sel("$[?(@hr == 60)]", &doc).len(), 2);
        assert_eq!(sel("$[?(@hr > 59)]", &doc).len(), 2);
    }

    #[test]
    fn nested_existence_and_quoted_names() {
        let doc = json!({"telemetry": {"BloodPressure": {"Diastolic": 7}}, "My Property": "data"});
        assert_eq!(sel("$..[?(@telemetry.BloodPressure.Diastolic)]", &doc).len(), 1);
        assert_eq!(sel("$..[?(@['My Property'])]", &doc).len(), 1);
        assert_eq!(sel("$.['My Property']", &doc), vec![json!("data")]);
        assert_eq!(sel("$['My Property']", &doc), vec![json!("data")]);
    }

    #[test]
    fn hyphenated_names() {
        let doc = json!({"SystemProperties": {"iothub-connection-device-id": "dev"}});
        assert_eq!(sel("$.SystemProperties.iothub-connection-device-id", &doc), vec![json!("dev")]);
    }

    #[test]
    fn indices_slices_wildcards_and_descendant_names() {
        let doc = json!({"a": [1, 2, 3, 4], "b": {"a": 5}});
        assert_eq!(sel("$.a[0]", &doc), vec![json!(1)]);
        assert_eq!(sel("$.a[-1]", &doc), vec![json!(4)]);
        assert_eq!(sel("$.a[1:3]", &doc), vec![json!(2), json!(3)]);
        assert_eq!(sel("$.a[0,2]", &doc), vec![json!(1), json!(3)]);
        assert_eq!(sel("$.a[*]", &doc).len(), 4);
        assert_eq!(sel("$..a", &doc), vec![json!([1, 2, 3, 4]), json!(5)]);
        assert_eq!(sel("$.*", &doc).len(), 2);
    }

    #[test]
    fn matched_token_is_a_virtual_member_of_the_root() {
        let event = json!({"Body": {"deviceId": "d1"}});
        let m = json!({"hr": 5});
        let p = JsonPath::parse("$.matchedToken.hr").unwrap_or_else(|e| panic!("{e}"));
        let got = p.select(Scope { root: &event, matched: Some(&m) });
        assert_eq!(got, vec![&json!(5)]);
        let p = JsonPath::parse("$.Body.deviceId").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.select(Scope { root: &event, matched: Some(&m) }), vec![&json!("d1")]);
    }

    #[test]
    fn a_slice_step_near_i64_max_ends_the_slice() {
        // The fuzz seed load_mapping/slice-steps: the index after the first step overflowed i64 (a
        // panic wherever overflow checks are on).
        let doc = json!({"a": [1, 2, 3, 4]});
        assert_eq!(sel("$.a[1:4:9223372036854775807]", &doc), vec![json!(2)]);
        assert_eq!(sel("$.a[::-9223372036854775808]", &doc), vec![json!(4)]);
    }

    #[test]
    fn nesting_past_the_bound_is_a_parse_error_not_a_stack_overflow() {
        let doc = json!([{"a": 1}]);
        let ok = format!("$[?({}@a{})]", "(".repeat(MAX_NESTING - 2), ")".repeat(MAX_NESTING - 2));
        assert_eq!(sel(&ok, &doc).len(), 1);
        let bang = format!("$[?({}@a)]", "!".repeat(MAX_NESTING - 1));
        assert!(sel(&bang, &doc).is_empty(), "an odd number of '!' negates");
        for deep in [
            format!("$[?({}@a{})]", "(".repeat(100_000), ")".repeat(100_000)),
            format!("$[?({}@a)]", "!".repeat(100_000)),
            format!("$[?({}@a{})]", "@[?(".repeat(100_000), ")]".repeat(100_000)),
        ] {
            let e = JsonPath::parse(&deep).expect_err("too deep");
            assert!(e.message.contains("nest more than 64 deep"), "{e}");
            assert!(e.offset < 300, "the error is where the bound was passed: {e}");
        }
    }

    #[test]
    fn parse_errors_say_where() {
        for bad in ["heartRate", "$.", "$[", "$..[?(@a", "$[?(@a =~ /x/)]", "$.a]"] {
            let e = JsonPath::parse(bad).expect_err(bad);
            assert!(!e.message.is_empty(), "{bad}");
        }
    }
}
