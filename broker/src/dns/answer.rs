//! What the responder does with one DNS message: a pure function over bytes, tested without
//! sockets. Messages are parsed and built with `hickory-proto`.
//!
//! - A query for a managed name (one question, class IN) is answered here: `A` with the run's
//!   one fake address `127.77.<slot>.1` (the one the `getaddrinfo` hook gives), `AAAA` with
//!   its v4-mapped form `::ffff:127.77.<slot>.1` (as the hook does for `AF_INET6`: the
//!   `connect` hook reroutes either), and every other type (HTTPS/SVCB, MX, TXT, ...) with an
//!   empty NOERROR, so no record carries a real address (an HTTPS record's `ipv4hint`) or a
//!   CNAME out of the run.
//! - Any other query is forwarded to the system's resolver and its answer relayed unchanged,
//!   minus one thing in the query: the EDNS COOKIE option (RFC 7873). The client believes it
//!   talks to one server; answers made here carry no server cookie, and c-ares drops an
//!   answer without one from a server it has seen cookies from. Taking the cookie out of the
//!   forwarded query keeps every answer the client sees cookie-free, so it settles on "this
//!   server does not do cookies" instead of dropping the broker's answers.

use std::net::{IpAddr, Ipv4Addr};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::opt::EdnsCode;
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};

use broker_contract::{host_matches, run_ipv4};

/// TTL of an answer for a managed name. The fake address is fixed for the run's life; a short
/// TTL keeps a cache in a long-lived process from outliving the run by much.
pub const MANAGED_TTL: u32 = 30;
/// The EDNS payload size advertised in answers made here (the DNS flag day 2020 value).
const EDNS_PAYLOAD: u16 = 1232;

/// What to do with one message from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this answer back.
    Answer(Vec<u8>),
    /// Send this query to the system's resolver and relay its answer.
    Forward(Vec<u8>),
    /// Not a query (a response, garbage shorter than a header): say nothing.
    Drop,
}

/// The run a responder answers for.
#[derive(Debug, Clone)]
pub struct RunNames {
    pub slot: u8,
    /// Managed host patterns: each name they match resolves to the run's one fake address.
    pub hosts: Vec<String>,
}

impl RunNames {
    /// The fake IPv4 address of `name` (the run's one address), if it is managed in this run.
    pub fn fake_address(&self, name: &str) -> Option<Ipv4Addr> {
        self.hosts
            .iter()
            .any(|p| host_matches(p, name))
            .then(|| run_ipv4(self.slot))
    }
}

/// Decide what to do with `message`, received from a client.
pub fn decide(names: &RunNames, message: &[u8]) -> Action {
    let Ok(query) = Message::from_vec(message) else {
        // Something hickory cannot parse (an extension it does not know): the system's
        // resolver is the judge. It cannot name a managed host hickory could not read.
        return match message.len() >= 12 && message[2] & 0x80 == 0 {
            true => Action::Forward(message.to_vec()),
            false => Action::Drop,
        };
    };
    if query.message_type() != MessageType::Query {
        return Action::Drop;
    }
    let managed: Vec<Option<Ipv4Addr>> = query
        .queries()
        .iter()
        .map(|q| names.fake_address(&q.name().to_ascii()))
        .collect();
    match (query.op_code(), managed.as_slice()) {
        (OpCode::Query, [Some(v4)]) => Action::Answer(answer_managed(&query, *v4)),
        // More than one question with a managed name among them: no resolver answers those,
        // and forwarding would hand out the real address.
        (_, list) if list.iter().any(Option::is_some) => {
            Action::Answer(refusal(&query, ResponseCode::Refused))
        }
        _ => Action::Forward(without_cookie(query, message)),
    }
}

/// The answer for a query about a managed name whose fake address is `v4`.
fn answer_managed(query: &Message, v4: Ipv4Addr) -> Vec<u8> {
    let mut answer = response_to(query, ResponseCode::NoError);
    if let Some(q) = query.query() {
        let rdata = match (q.query_class(), q.query_type()) {
            (DNSClass::IN, RecordType::A) => Some(RData::A(A(v4))),
            (DNSClass::IN, RecordType::AAAA) => Some(RData::AAAA(AAAA(v4.to_ipv6_mapped()))),
            _ => None,
        };
        if let Some(rdata) = rdata {
            answer.add_answer(Record::from_rdata(q.name().clone(), MANAGED_TTL, rdata));
        }
    }
    encode(&answer, query)
}

/// An answer with `code` and no records.
fn refusal(query: &Message, code: ResponseCode) -> Vec<u8> {
    encode(&response_to(query, code), query)
}

/// A response with the query's id, flags and questions, and EDNS if the query had it.
fn response_to(query: &Message, code: ResponseCode) -> Message {
    let mut response = Message::new();
    response
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_checking_disabled(query.checking_disabled())
        .set_response_code(code)
        .add_queries(query.queries().iter().cloned());
    if query.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        response.set_edns(edns);
    }
    response
}

/// `message` as bytes; a SERVFAIL with the query's id if it cannot be encoded (it always can:
/// it holds only what was just parsed plus one record).
fn encode(message: &Message, query: &Message) -> Vec<u8> {
    message.to_vec().unwrap_or_else(|_| {
        Message::error_msg(query.id(), query.op_code(), ResponseCode::ServFail)
            .to_vec()
            .unwrap_or_default()
    })
}

/// The query to forward: `original` itself, or re-encoded without its COOKIE option.
fn without_cookie(mut query: Message, original: &[u8]) -> Vec<u8> {
    let has_cookie = query
        .extensions()
        .as_ref()
        .is_some_and(|e| e.option(EdnsCode::Cookie).is_some());
    if !has_cookie {
        return original.to_vec();
    }
    if let Some(edns) = query.extensions_mut() {
        edns.options_mut().remove(EdnsCode::Cookie);
    }
    query.to_vec().unwrap_or_else(|_| original.to_vec())
}

/// The addresses in the answer section of a response (for tests and the benchmark).
pub fn answer_addresses(response: &[u8]) -> Option<Vec<IpAddr>> {
    let message = Message::from_vec(response).ok()?;
    Some(
        message
            .answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::rdata::opt::EdnsOption;
    use hickory_proto::rr::Name;

    fn names() -> RunNames {
        RunNames {
            slot: 3,
            hosts: vec!["api.openai.com".into(), "*.openai.azure.com".into()],
        }
    }

    fn query(name: &str, rtype: RecordType, edns: Option<Edns>) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(0x1234)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_ascii(name).expect("name"), rtype));
        if let Some(e) = edns {
            m.set_edns(e);
        }
        m.to_vec().expect("encode")
    }

    fn answered(action: Action) -> Message {
        match action {
            Action::Answer(bytes) => Message::from_vec(&bytes).expect("parse answer"),
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    #[test]
    fn managed_names_get_the_run_address() {
        let a = answered(decide(
            &names(),
            &query("api.openai.com.", RecordType::A, None),
        ));
        assert_eq!(a.id(), 0x1234);
        assert_eq!(a.message_type(), MessageType::Response);
        assert_eq!(a.response_code(), ResponseCode::NoError);
        assert!(a.recursion_desired() && a.recursion_available());
        assert_eq!(a.queries().len(), 1);
        let bytes = a.to_vec().expect("encode");
        assert_eq!(
            answer_addresses(&bytes),
            Some(vec!["127.77.3.1".parse().expect("ip")])
        );
        assert_eq!(a.answers()[0].ttl(), MANAGED_TTL);
        // Case and the wildcard pattern, AAAA as v4-mapped: every managed name gets the
        // run's one address.
        let q = query("RES1.openai.AZURE.com", RecordType::AAAA, None);
        let a = answered(decide(&names(), &q));
        assert_eq!(
            answer_addresses(&a.to_vec().expect("encode")),
            Some(vec!["::ffff:127.77.3.1".parse().expect("ip")])
        );
    }

    #[test]
    fn other_types_of_managed_names_are_empty() {
        for rtype in [RecordType::HTTPS, RecordType::CNAME, RecordType::TXT] {
            let a = answered(decide(&names(), &query("api.openai.com", rtype, None)));
            assert_eq!(a.response_code(), ResponseCode::NoError);
            assert!(a.answers().is_empty(), "{rtype}");
        }
    }

    #[test]
    fn other_names_are_forwarded_unchanged() {
        let q = query("example.org", RecordType::A, Some(Edns::new()));
        assert_eq!(decide(&names(), &q), Action::Forward(q.clone()));
        // One label more than the wildcard allows is not managed.
        let q = query("a.b.openai.azure.com", RecordType::A, None);
        assert_eq!(decide(&names(), &q), Action::Forward(q.clone()));
    }

    #[test]
    fn cookies_are_taken_out_of_forwarded_queries() {
        let mut edns = Edns::new();
        edns.options_mut().insert(EdnsOption::Unknown(
            u16::from(EdnsCode::Cookie),
            vec![1, 2, 3, 4, 5, 6, 7, 8],
        ));
        let q = query("example.org", RecordType::A, Some(edns));
        let Action::Forward(sent) = decide(&names(), &q) else {
            panic!("forwarded")
        };
        let sent = Message::from_vec(&sent).expect("parse");
        assert_eq!(sent.id(), 0x1234);
        assert_eq!(sent.queries(), Message::from_vec(&q).expect("q").queries());
        let edns = sent.extensions().as_ref().expect("edns kept");
        assert!(edns.option(EdnsCode::Cookie).is_none());
        // Answers made here echo EDNS, without a cookie.
        let q = query("api.openai.com", RecordType::A, Some(Edns::new()));
        let a = answered(decide(&names(), &q));
        let edns = a.extensions().as_ref().expect("edns in answer");
        assert!(edns.option(EdnsCode::Cookie).is_none());
    }

    #[test]
    fn responses_and_garbage_are_dropped_or_passed_on() {
        let mut m = Message::new();
        m.set_message_type(MessageType::Response);
        assert_eq!(decide(&names(), &m.to_vec().expect("encode")), Action::Drop);
        assert_eq!(decide(&names(), b"\x00\x01"), Action::Drop);
        // A header-sized query hickory cannot read goes to the real resolver, which says so.
        let junk = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff];
        assert_eq!(decide(&names(), &junk), Action::Forward(junk.to_vec()));
    }

    #[test]
    fn a_managed_name_among_several_questions_is_refused() {
        let mut m = Message::new();
        m.set_id(7)
            .add_query(Query::query(
                Name::from_ascii("example.org").expect("name"),
                RecordType::A,
            ))
            .add_query(Query::query(
                Name::from_ascii("api.openai.com").expect("name"),
                RecordType::A,
            ));
        let a = answered(decide(&names(), &m.to_vec().expect("encode")));
        assert_eq!(a.response_code(), ResponseCode::Refused);
        assert!(a.answers().is_empty());
    }
}
