//! Traefik's router rule language: `Host(...)`, `HostRegexp(...)`, `Path(...)`,
//! `PathPrefix(...)`, `PathRegexp(...)`, `Method(...)`, `Header(...)`, `HeaderRegexp(...)`,
//! `Query(...)`, `QueryRegexp(...)`, `ClientIP(...)`, joined by `&&`, `||`, `!` and
//! parentheses (v3 syntax; v2's `Headers`, `HeadersRegexp`, `HostHeader`, `Query(`k=v`)`,
//! several arguments and `{name:regex}` placeholders are read too).
//!
//! A rule becomes a list of alternatives (its disjunctive normal form, `!` pushed down to
//! the matchers), each a set of host patterns, a path prefix and the conditions a request
//! must also meet. What cannot be said that way (two `Host` in one alternative) is an error
//! that names the problem, so the router is skipped with a warning instead of being routed
//! wrongly.

use crate::state::{Condition, HostError, HostPattern, Test};

/// The most alternatives a rule may expand to (`!` over long `&&` chains multiplies them).
const MAX_ALTERNATIVES: usize = 64;

/// Why a rule is refused; each names the problem (and where, when it can).
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("expected `{0}{0}` at position {1}")]
    Doubled(char, usize),
    #[error("expected `(` after `{0}`")]
    NoParenthesis(String),
    #[error("unterminated string in `{0}(...)`")]
    Unterminated(String),
    #[error("unexpected `{0}` at position {1} in `{2}(...)`: quote arguments with backticks")]
    Unquoted(char, usize, String),
    #[error("`{0}(` is not closed")]
    CallNotClosed(String),
    #[error("unexpected `{0}` at position {1}")]
    Unexpected(char, usize),
    #[error("the rule ends too early")]
    EndsEarly,
    #[error("a `(` is not closed")]
    NotClosed,
    #[error("`&&` or `||` without a matcher before it")]
    DanglingOperator,
    #[error("unexpected `)`")]
    UnexpectedClose,
    #[error("two host matchers joined by `&&` are not supported")]
    TwoHosts,
    #[error("`{0}()` needs an argument")]
    NoArgument(String),
    #[error("`{0}(...)` takes {1}")]
    Arguments(String, &'static str),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("path `{0}` must start with `/`")]
    Path(String),
    #[error("`{0}` is not a regular expression: {1}")]
    Regex(String, regex::Error),
    #[error("`{0}` is neither a network nor an address")]
    Network(String),
    #[error("`{0}(...)` is not a Traefik matcher")]
    Unsupported(String),
    #[error("the rule expands to more than {MAX_ALTERNATIVES} alternatives; simplify it")]
    TooComplex,
    #[error("unexpected text after the end of the rule")]
    Trailing,
}

/// One way the rule can match: any of `hosts` (none: any host) with `path` as the prefix,
/// and all of `conditions`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alternative {
    pub hosts: Vec<HostPattern>,
    pub path: Option<String>,
    pub conditions: Vec<Condition>,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Func(String, Vec<String>),
    And,
    Or,
    Not,
    Open,
    Close,
}

fn tokenize(rule: &str) -> Result<Vec<Token>, RuleError> {
    let mut tokens = Vec::new();
    let mut chars = rule.char_indices().peekable();
    while let Some(&(i, c)) = chars.peek() {
        match c {
            ' ' | '\t' | '\n' => {
                chars.next();
            }
            '(' => {
                chars.next();
                tokens.push(Token::Open);
            }
            ')' => {
                chars.next();
                tokens.push(Token::Close);
            }
            '&' | '|' => {
                chars.next();
                if chars.next().map(|(_, d)| d) != Some(c) {
                    return Err(RuleError::Doubled(c, i));
                }
                tokens.push(if c == '&' { Token::And } else { Token::Or });
            }
            '!' => {
                chars.next();
                tokens.push(Token::Not);
            }
            c if c.is_ascii_alphabetic() => {
                let mut name = String::new();
                while let Some(&(_, c)) = chars.peek() {
                    if c.is_ascii_alphanumeric() {
                        name.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                while chars.peek().is_some_and(|&(_, c)| c == ' ') {
                    chars.next();
                }
                if chars.next().map(|(_, c)| c) != Some('(') {
                    return Err(RuleError::NoParenthesis(name));
                }
                let mut args = Vec::new();
                loop {
                    match chars.next() {
                        Some((_, ' ' | ',')) => {}
                        Some((_, ')')) => break,
                        Some((_, q @ ('`' | '"' | '\''))) => {
                            let mut arg = String::new();
                            loop {
                                match chars.next() {
                                    Some((_, c)) if c == q => break,
                                    Some((_, c)) => arg.push(c),
                                    None => return Err(RuleError::Unterminated(name)),
                                }
                            }
                            args.push(arg);
                        }
                        Some((j, c)) => return Err(RuleError::Unquoted(c, j, name)),
                        None => return Err(RuleError::CallNotClosed(name)),
                    }
                }
                tokens.push(Token::Func(name, args));
            }
            _ => return Err(RuleError::Unexpected(c, i)),
        }
    }
    Ok(tokens)
}

/// A matcher, as the rule says it.
#[derive(Clone, Debug)]
enum Literal {
    Hosts(Vec<HostPattern>),
    PathPrefix(String),
    Test(Test),
}

/// The rule as a tree.
enum Expr {
    Lit(Literal),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
}

/// A conjunction of matchers, each maybe negated.
type Conjunction = Vec<(bool, Literal)>;

/// Recursive descent: `or := and ('||' and)*`, `and := unary ('&&' unary)*`,
/// `unary := '!' unary | atom`, `atom := Func | '(' or ')'`.
struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn or(&mut self) -> Result<Expr, RuleError> {
        let mut left = self.and()?;
        while self.tokens.get(self.pos) == Some(&Token::Or) {
            self.pos += 1;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, RuleError> {
        let mut left = self.unary()?;
        while self.tokens.get(self.pos) == Some(&Token::And) {
            self.pos += 1;
            left = Expr::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, RuleError> {
        if self.tokens.get(self.pos) == Some(&Token::Not) {
            self.pos += 1;
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        self.atom()
    }

    fn atom(&mut self) -> Result<Expr, RuleError> {
        let token = self.tokens.get(self.pos).cloned().ok_or(RuleError::EndsEarly)?;
        self.pos += 1;
        match token {
            Token::Open => {
                let expr = self.or()?;
                if self.tokens.get(self.pos) != Some(&Token::Close) {
                    return Err(RuleError::NotClosed);
                }
                self.pos += 1;
                Ok(expr)
            }
            Token::Func(name, args) => matcher(&name, &args),
            Token::And | Token::Or => Err(RuleError::DanglingOperator),
            Token::Not => Err(RuleError::EndsEarly),
            Token::Close => Err(RuleError::UnexpectedClose),
        }
    }
}

/// The disjunctive normal form of `expr` (negated when `negate`), `!` pushed down to the
/// matchers (De Morgan).
fn dnf(expr: &Expr, negate: bool) -> Result<Vec<Conjunction>, RuleError> {
    let product = |a: Vec<Conjunction>, b: Vec<Conjunction>| -> Result<Vec<Conjunction>, RuleError> {
        if a.len() * b.len() > MAX_ALTERNATIVES {
            return Err(RuleError::TooComplex);
        }
        Ok(a.iter().flat_map(|x| b.iter().map(move |y| x.iter().chain(y).cloned().collect())).collect())
    };
    let union = |mut a: Vec<Conjunction>, b: Vec<Conjunction>| {
        a.extend(b);
        if a.len() > MAX_ALTERNATIVES {
            return Err(RuleError::TooComplex);
        }
        Ok(a)
    };
    match (expr, negate) {
        (Expr::Lit(l), _) => Ok(vec![vec![(negate, l.clone())]]),
        (Expr::Not(e), _) => dnf(e, !negate),
        (Expr::And(a, b), false) => product(dnf(a, false)?, dnf(b, false)?),
        (Expr::Or(a, b), false) => union(dnf(a, false)?, dnf(b, false)?),
        (Expr::And(a, b), true) => union(dnf(a, true)?, dnf(b, true)?),
        (Expr::Or(a, b), true) => product(dnf(a, true)?, dnf(b, true)?),
    }
}

/// One conjunction as a route's hosts, path prefix and conditions.
fn alternative(conjunction: Conjunction) -> Result<Alternative, RuleError> {
    let mut alt = Alternative { hosts: Vec::new(), path: None, conditions: Vec::new() };
    for (negated, literal) in conjunction {
        let condition = |test| Condition { negated, test };
        match literal {
            Literal::Hosts(hosts) if !negated => {
                if !alt.hosts.is_empty() {
                    return Err(RuleError::TwoHosts);
                }
                alt.hosts = hosts;
            }
            Literal::Hosts(hosts) => alt.conditions.push(condition(Test::Host { hosts })),
            Literal::PathPrefix(prefix) if !negated && alt.path.is_none() => alt.path = Some(prefix),
            Literal::PathPrefix(prefix) => alt.conditions.push(condition(Test::PathPrefix { prefix })),
            Literal::Test(test) => {
                // An exact path is also the route's prefix (the router finds it by prefix).
                if let (false, Test::Path { path }, None) = (negated, &test, &alt.path) {
                    alt.path = Some(path.clone());
                }
                alt.conditions.push(condition(test));
            }
        }
    }
    Ok(alt)
}

fn one<'a>(name: &str, args: &'a [String]) -> Result<&'a str, RuleError> {
    match args {
        [one] => Ok(one),
        _ => Err(RuleError::Arguments(name.to_owned(), "one argument")),
    }
}

fn two<'a>(name: &str, args: &'a [String]) -> Result<(&'a str, &'a str), RuleError> {
    match args {
        [a, b] => Ok((a, b)),
        _ => Err(RuleError::Arguments(name.to_owned(), "two arguments")),
    }
}

fn checked_regex(pattern: &str) -> Result<String, RuleError> {
    regex::Regex::new(pattern)
        .map(|_| pattern.to_owned())
        .map_err(|e| RuleError::Regex(pattern.to_owned(), e))
}

/// `args` joined by `||` (v2 matchers take several).
fn any(args: &[String], each: impl Fn(&str) -> Result<Literal, RuleError>) -> Result<Expr, RuleError> {
    let mut exprs = args.iter().map(|a| each(a).map(Expr::Lit));
    let first = exprs.next().ok_or(RuleError::EndsEarly)??;
    exprs.try_fold(first, |left, right| Ok(Expr::Or(Box::new(left), Box::new(right?))))
}

fn path_arg(p: &str) -> Result<&str, RuleError> {
    if p.starts_with('/') {
        Ok(p)
    } else {
        Err(RuleError::Path(p.to_owned()))
    }
}

fn matcher(name: &str, args: &[String]) -> Result<Expr, RuleError> {
    if args.is_empty() {
        return Err(RuleError::NoArgument(name.to_owned()));
    }
    let test = |t: Test| Ok(Expr::Lit(Literal::Test(t)));
    match name {
        "Host" | "HostHeader" => Ok(Expr::Lit(Literal::Hosts(
            args.iter().map(|h| HostPattern::parse(h)).collect::<Result<_, _>>()?,
        ))),
        "HostRegexp" => Ok(Expr::Lit(Literal::Hosts(
            args.iter().map(|h| HostPattern::regex(&traefik_v2_regex(h))).collect::<Result<_, _>>()?,
        ))),
        "PathPrefix" => any(args, |p| {
            let p = path_arg(p)?;
            Ok(if p.contains('{') {
                Literal::Test(Test::PathRegexp { regex: checked_regex(&v2_path_regex(p, false))? })
            } else {
                Literal::PathPrefix(p.to_owned())
            })
        }),
        "Path" => any(args, |p| {
            let p = path_arg(p)?;
            Ok(Literal::Test(if p.contains('{') {
                Test::PathRegexp { regex: checked_regex(&v2_path_regex(p, true))? }
            } else {
                Test::Path { path: p.to_owned() }
            }))
        }),
        "PathRegexp" => test(Test::PathRegexp { regex: checked_regex(one(name, args)?)? }),
        "Method" => {
            test(Test::Method { methods: args.iter().map(|m| m.trim().to_ascii_uppercase()).collect() })
        }
        "Header" | "Headers" => {
            let (k, v) = two(name, args)?;
            test(Test::Header { name: k.trim().to_ascii_lowercase(), value: v.to_owned() })
        }
        "HeaderRegexp" | "HeadersRegexp" => {
            let (k, v) = two(name, args)?;
            test(Test::HeaderRegexp { name: k.trim().to_ascii_lowercase(), regex: checked_regex(v)? })
        }
        "Query" => match args {
            [kv] => {
                let (key, value) =
                    kv.split_once('=').map_or((kv.as_str(), None), |(k, v)| (k, Some(v.to_owned())));
                test(Test::Query { key: key.to_owned(), value })
            }
            [k, v] => test(Test::Query { key: k.clone(), value: Some(v.clone()) }),
            _ => Err(RuleError::Arguments(name.to_owned(), "a key and maybe a value")),
        },
        "QueryRegexp" => {
            let (k, v) = two(name, args)?;
            test(Test::QueryRegexp { key: k.to_owned(), regex: checked_regex(v)? })
        }
        "ClientIP" => {
            let networks = args
                .iter()
                .map(|n| crate::state::parse_network(n).map_err(|_| RuleError::Network(n.clone())))
                .collect::<Result<_, _>>()?;
            test(Test::ClientIp { networks })
        }
        other => Err(RuleError::Unsupported(other.to_owned())),
    }
}

/// A v2 path with `{name}` or `{name:regex}` placeholders as an anchored regex (`exact`:
/// the whole path; else a prefix).
fn v2_path_regex(path: &str, exact: bool) -> String {
    let mut out = String::from("^");
    let mut rest = path;
    while let Some(start) = rest.find('{') {
        out.push_str(&regex::escape(&rest[..start]));
        let Some(end) = rest[start..].find('}') else { break };
        let inner = &rest[start + 1..start + end];
        out.push_str("(?:");
        out.push_str(inner.split_once(':').map_or("[^/]+", |(_, re)| re));
        out.push(')');
        rest = &rest[start + end + 1..];
    }
    out.push_str(&regex::escape(rest));
    if exact {
        out.push('$');
    }
    out
}

/// Traefik v2 writes `{name:regex}` placeholders (`{sub:[a-z]+}.example.com`), matched
/// against the whole host; v3 takes a plain regex, searched. Placeholders become groups, a v2
/// pattern's dots become literal, and it is anchored at both ends.
fn traefik_v2_regex(pattern: &str) -> String {
    if !pattern.contains('{') {
        return pattern.to_owned();
    }
    let mut out = String::new();
    let mut rest = pattern;
    while let Some(start) = rest.find('{') {
        out.push_str(&regex::escape(&rest[..start]));
        let Some(end) = rest[start..].find('}') else { break };
        let inner = &rest[start + 1..start + end];
        let re = inner.split_once(':').map_or("[^.]+", |(_, re)| re);
        out.push_str("(?:");
        out.push_str(re);
        out.push(')');
        rest = &rest[start + end + 1..];
    }
    out.push_str(&regex::escape(rest));
    format!("^(?:{out})$")
}

/// Parses a rule into its alternatives.
pub fn parse(rule: &str) -> Result<Vec<Alternative>, RuleError> {
    let mut parser = Parser { tokens: tokenize(rule)?, pos: 0 };
    let expr = parser.or()?;
    if parser.pos != parser.tokens.len() {
        return Err(RuleError::Trailing);
    }
    dnf(&expr, false)?.into_iter().map(alternative).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(h: &str) -> HostPattern {
        HostPattern::parse(h).unwrap()
    }

    fn alt(hosts: Vec<HostPattern>, path: Option<String>) -> Alternative {
        Alternative { hosts, path, conditions: Vec::new() }
    }

    #[test]
    fn matchers_beyond_host_and_path_become_conditions_and_negation_is_pushed_down() {
        let a = parse("Host(`a.com`) && Method(`POST`) && Header(`X-Canary`, `1`)").unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(
            a[0].conditions,
            vec![
                Condition::is(Test::Method { methods: vec!["POST".into()] }),
                Condition::is(Test::Header { name: "x-canary".into(), value: "1".into() }),
            ]
        );
        // Path is exact: the route's prefix, and a condition.
        let a = parse("Host(`a.com`) && Path(`/ping`)").unwrap();
        assert_eq!((a[0].path.as_deref(), a[0].conditions.len()), (Some("/ping"), 1));
        // !(A || B) is !A && !B: one alternative with two negated conditions.
        let a = parse("Host(`a.com`) && !(PathPrefix(`/admin`) || ClientIP(`10.0.0.0/8`))").unwrap();
        assert_eq!(a.len(), 1, "{a:?}");
        assert!(a[0].path.is_none() && a[0].conditions.iter().all(|c| c.negated), "{a:?}");
        // !(A && B) is !A || !B: two alternatives.
        let a = parse("Host(`a.com`) && !(Method(`GET`) && Query(`debug`))").unwrap();
        assert_eq!(a.len(), 2, "{a:?}");
        // v2 forms.
        let a =
            parse("Host(`a.com`) && Headers(`X`, `y`) && Query(`k=v`) && PathPrefix(`/a`, `/b`)").unwrap();
        assert_eq!(a.len(), 2);
        assert!(a[0]
            .conditions
            .contains(&Condition::is(Test::Query { key: "k".into(), value: Some("v".into()) })));
        let a = parse("Host(`a.com`) && Path(`/articles/{id:[0-9]+}`)").unwrap();
        assert!(
            matches!(&a[0].conditions[0].test, Test::PathRegexp { regex } if regex == "^/articles/(?:[0-9]+)$")
        );
    }

    #[test]
    fn common_rules() {
        assert_eq!(parse("Host(`a.com`)").unwrap(), vec![alt(vec![host("a.com")], None)]);
        assert_eq!(
            parse("Host(`a.com`, `b.com`) && PathPrefix(`/api`)").unwrap(),
            vec![alt(vec![host("a.com"), host("b.com")], Some("/api".into()))]
        );
        assert_eq!(
            parse("Host(`a.com`) || Host(`b.com`) && PathPrefix(`/x`)").unwrap(),
            vec![alt(vec![host("a.com")], None), alt(vec![host("b.com")], Some("/x".into())),]
        );
        assert_eq!(
            parse("(Host(`a.com`) || Host(`b.com`)) && PathPrefix(`/x`)").unwrap(),
            vec![alt(vec![host("a.com")], Some("/x".into())), alt(vec![host("b.com")], Some("/x".into())),]
        );
    }

    #[test]
    fn host_regexp_v2_and_v3() {
        let v2 = parse("HostRegexp(`{sub:[a-z]+}.example.com`)").unwrap();
        let HostPattern::Regex(re) = &v2[0].hosts[0] else { panic!() };
        let re = regex::Regex::new(re).unwrap();
        assert!(
            re.is_match("abc.example.com")
                && !re.is_match("abc.examplexcom")
                && !re.is_match("a1.example.com")
        );
        let v3 = parse("HostRegexp(`^[a-z]+\\.example\\.com$`)").unwrap();
        assert!(matches!(&v3[0].hosts[0], HostPattern::Regex(_)));
    }

    #[test]
    fn bad_rules_say_what_is_wrong() {
        for (rule, needle) in [
            ("Host(`a.com`", "not closed"),
            ("Host(a.com)", "backticks"),
            ("Host(`a.com`) && Header(`X`)", "two arguments"),
            ("Host(`a.com`) && Foo(`x`)", "not a Traefik matcher"),
            ("Host(`a.com`) && PathRegexp(`(`)", "not a regular expression"),
            ("Host(`a.com`) && ClientIP(`nope`)", "neither a network"),
            ("!(Method(`A`) && Method(`B`) && Method(`C`) && Method(`D`) && Method(`E`) && Method(`F`) && Method(`G`)) && !(Method(`A`) && Method(`B`) && Method(`C`) && Method(`D`) && Method(`E`) && Method(`F`) && Method(`G`) && Method(`H`) && Method(`I`) && Method(`J`))", "more than 64"),
            ("Host(`a.com`) && Host(`b.com`)", "two host"),
            ("Host(`a.com`) &", "`&&`"),
            ("PathPrefix(`api`)", "must start with"),
            ("Host(`bad host`)", "not a valid host"),
            ("", "ends too early"),
        ] {
            let err = parse(rule).unwrap_err().to_string();
            assert!(err.contains(needle), "{rule:?}: {err}");
        }
    }

    #[test]
    fn fuzzed_rules_are_parsed_or_refused_never_a_crash() {
        let pieces = [
            "Host(",
            "HostRegexp(",
            "PathPrefix(",
            "Path(",
            "Header(",
            "Method(",
            "ClientIP(",
            "Query(",
            ")",
            "(",
            "`a.example.com`",
            "`{sub:[a-z]+}.b.test`",
            "`/api`",
            "`*.c.test`",
            ",",
            " ",
            "&&",
            "||",
            "!",
            "\"",
            "'",
            "`",
            "&",
            "|",
        ];
        crate::fuzz::run(
            "traefik rule",
            |rng| crate::fuzz::text(rng, &pieces, 12),
            |rule| {
                if let Ok(alternatives) = parse(rule) {
                    for a in alternatives {
                        assert!(a.path.as_deref().is_none_or(|p| p.starts_with('/')), "{a:?}");
                    }
                }
            },
        );
    }
}
