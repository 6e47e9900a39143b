//! The stream layer on every stanza shape a server may route.

use super::*;
use crate::inbound::{Exceeded, Inbound, Limits};
use xmpp_parsers::minidom::Element;

const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' \
    xmlns:stream='http://etherx.jabber.org/streams' from='proxy.example' id='abc123'>";

fn limits() -> Limits {
    Limits {
        max_bytes: 64 * 1024,
        max_depth: 16,
        max_nodes: crate::inbound::MAX_NODES,
    }
}

/// Everything read from `bytes` fed in chunks of `chunk` bytes.
fn read_all(bytes: &[u8], chunk: usize, limits: Limits) -> Result<Vec<Frame>, ReadError> {
    let mut r = Reader::new(limits);
    let mut frames = Vec::new();
    for c in bytes.chunks(chunk.max(1)) {
        r.feed(c)?;
        while let Some(f) = r.next_frame()? {
            frames.push(f);
        }
        assert!(r.held() <= limits.max_bytes, "held {} bytes", r.held());
    }
    Ok(frames)
}

fn stanzas(frames: &[Frame]) -> Vec<&Inbound> {
    frames
        .iter()
        .filter_map(|f| match f {
            Frame::Stanza(i) => Some(i),
            _ => None,
        })
        .collect()
}

fn element(i: &Inbound) -> &Element {
    match i {
        Inbound::Element(e) => e,
        Inbound::Oversized(o) => panic!("oversized: {o:?}"),
    }
}

fn stream_of(stanzas: &[String]) -> Vec<u8> {
    let mut s = HEADER.to_owned();
    for st in stanzas {
        s.push_str(st);
        s.push_str("\n ");
    }
    s.push_str("</stream:stream>");
    s.into_bytes()
}

#[test]
fn header_stanzas_whitespace_and_footer_in_any_chunking() {
    let bytes = stream_of(&[
        "<handshake/>".into(),
        "<iq type='get' id='1' to='proxy.example' from='u@example/r'><q xmlns='urn:x'>t&amp;t</q></iq>"
            .into(),
        "<message to='proxy.example'><body>hi</body></message>".into(),
    ]);
    for chunk in [1, 2, 3, 7, 64, bytes.len()] {
        let frames = read_all(&bytes, chunk, limits()).unwrap();
        assert!(matches!(&frames[0], Frame::Header(h) if h.id.as_deref() == Some("abc123")));
        let s = stanzas(&frames);
        assert_eq!(s.len(), 3, "chunk {chunk}");
        let iq = element(s[1]);
        assert_eq!(iq.ns(), "jabber:component:accept");
        assert_eq!(iq.attr("id"), Some("1"));
        assert_eq!(iq.children().next().unwrap().text(), "t&t");
        assert!(matches!(frames.last(), Some(Frame::Footer)));
    }
}

#[test]
fn long_tokens_within_the_limit_are_read() {
    let long_id = "i".repeat(9_000);
    let long_value = "v".repeat(100_000);
    let long_name = format!("n{}", "a".repeat(9_000));
    let limits = Limits {
        max_bytes: 512 * 1024,
        max_depth: 64,
        max_nodes: crate::inbound::MAX_NODES,
    };
    let bytes = stream_of(&[
        format!("<iq type='get' id='{long_id}' to='proxy.example'><q xmlns='urn:x'/></iq>"),
        format!(
            "<iq type='get' id='2' to='proxy.example'><q xmlns='urn:x' a='{long_value}'/></iq>"
        ),
        format!("<iq type='get' id='3' to='proxy.example'><{long_name} xmlns='urn:x'/></iq>"),
        format!("<iq type='get' id='4' to='proxy.example'><q xmlns='urn:x'>{long_value}</q></iq>"),
    ]);
    for chunk in [1000, 8192, 65536] {
        let frames = read_all(&bytes, chunk, limits).unwrap();
        let s = stanzas(&frames);
        assert_eq!(s.len(), 4);
        assert_eq!(element(s[0]).attr("id"), Some(long_id.as_str()));
        let q = element(s[1]).children().next().unwrap();
        assert_eq!(q.attr("a").map(str::len), Some(100_000));
        assert_eq!(element(s[2]).children().next().unwrap().name(), long_name);
        assert_eq!(
            element(s[3]).children().next().unwrap().text().len(),
            100_000
        );
    }
}

#[test]
fn thousands_of_attributes_and_namespace_declarations() {
    let attrs: String = (0..5000).map(|i| format!(" a{i}='{i}'")).collect();
    let decls: String = (0..2000)
        .map(|i| format!(" xmlns:p{i}='urn:p:{i}'"))
        .collect();
    let bytes = stream_of(&[
        format!("<iq type='get' id='a' to='proxy.example'><q xmlns='urn:x'{attrs}/></iq>"),
        format!(
            "<iq type='get' id='n' to='proxy.example'><q xmlns='urn:x'{decls}><p1999:z/></q></iq>"
        ),
    ]);
    let frames = read_all(&bytes, 4096, limits()).unwrap();
    let s = stanzas(&frames);
    let q = element(s[0]).children().next().unwrap();
    assert_eq!(q.attrs().len(), 5000);
    let z = element(s[1])
        .children()
        .next()
        .unwrap()
        .children()
        .next()
        .unwrap();
    assert_eq!(z.ns(), "urn:p:1999");
}

#[test]
fn comments_pis_cdata_and_astral_characters() {
    let bytes = stream_of(&[
        "<!-- between --><?pi between?><message to='proxy.example'><!-- c --><body><?pi x?>a<![CDATA[<b>&]]>🦀\u{10FFFD}</body></message>"
            .into(),
    ]);
    for chunk in [1, 5, 4096] {
        let frames = read_all(&bytes, chunk, limits()).unwrap();
        let s = stanzas(&frames);
        assert_eq!(s.len(), 1);
        let body = element(s[0]).children().next().unwrap();
        assert_eq!(body.text(), "a<b>&🦀\u{10FFFD}");
    }
}

#[test]
fn over_the_limits_is_skipped_with_its_header_and_the_stream_goes_on() {
    let small = Limits {
        max_bytes: 4096,
        max_depth: 8,
        max_nodes: crate::inbound::MAX_NODES,
    };
    let big = "x".repeat(100_000);
    let deep = format!("{}{}", "<d>".repeat(10_000), "</d>".repeat(10_000));
    let bytes = stream_of(&[
        format!(
            "<iq type='set' id='big' from='u@e/r' to='proxy.example'><q xmlns='urn:x'>{big}</q></iq>"
        ),
        format!("<iq type='set' id='deep' from='u@e/r' to='proxy.example'>{deep}</iq>"),
        format!("<iq type='set' id='{big}' from='u@e/r' to='proxy.example'/>"),
        format!(
            "<iq type='set' id='attr' from='u@e/r' to='proxy.example'><q xmlns='urn:x' a='{big}'/></iq>"
        ),
        "<iq type='get' id='after' to='proxy.example'><q xmlns='urn:x'/></iq>".into(),
    ]);
    for chunk in [3, 1000, 8192] {
        let frames = read_all(&bytes, chunk, small).unwrap();
        let s = stanzas(&frames);
        assert_eq!(s.len(), 5);
        let Inbound::Oversized(o) = s[0] else {
            panic!()
        };
        assert_eq!(
            (o.id.as_deref(), o.exceeded),
            (Some("big"), Exceeded::Bytes(4096))
        );
        assert_eq!(o.from.as_deref(), Some("u@e/r"));
        assert_eq!(o.ns, "jabber:component:accept");
        let Inbound::Oversized(o) = s[1] else {
            panic!()
        };
        assert_eq!(
            (o.id.as_deref(), o.exceeded),
            (Some("deep"), Exceeded::Depth(8))
        );
        // A start tag over the limit by itself: its short attributes are kept, not the id.
        let Inbound::Oversized(o) = s[2] else {
            panic!()
        };
        assert_eq!((o.id.as_deref(), o.name.as_str()), (None, "iq"));
        assert_eq!(
            (o.from.as_deref(), o.type_.as_deref()),
            (Some("u@e/r"), Some("set"))
        );
        let Inbound::Oversized(o) = s[3] else {
            panic!()
        };
        assert_eq!(o.id.as_deref(), Some("attr"));
        assert_eq!(element(s[4]).attr("id"), Some("after"));
    }
}

#[test]
fn ill_formed_xml_is_an_error() {
    for bad in [
        "<iq><a></b></iq>",
        "<iq a='1' a='2'/>",
        "<!DOCTYPE x>",
        "<iq>&bogus;</iq>",
        "<p:iq/>",
        "< iq/>",
    ] {
        let mut bytes = HEADER.as_bytes().to_vec();
        bytes.extend_from_slice(bad.as_bytes());
        assert!(read_all(&bytes, 4096, limits()).is_err(), "{bad}");
    }
    assert!(read_all(b"<foo/>", 10, limits()).is_err());
}

#[test]
fn written_elements_read_back_and_resume_at_any_boundary() {
    let mut w = Writer::new();
    let mut out = Vec::new();
    w.header(&[("to", "proxy.example")], &mut out);
    let stanzas_in: Vec<Element> = [
        "<iq xmlns='jabber:component:accept' type='get' id='1' to='a@b/c'><q xmlns='urn:x' v='&apos;&quot;&lt;'>\u{1F980}&amp;</q></iq>",
        "<message xmlns='jabber:component:accept' to='a@b'><body xml:lang='en'>x</body><x xmlns='urn:y'/></message>",
        "<stream:error xmlns:stream='http://etherx.jabber.org/streams'><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let mut boundaries = Vec::new();
    for el in &stanzas_in {
        w.element(el, &mut out).unwrap();
        boundaries.push(out.len());
    }
    assert!(!String::from_utf8_lossy(&out[boundaries[0]..]).contains("jabber:component:accept"));
    let frames = read_all(&out, 17, limits())
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)));
    let Frame::Header(_) = &frames[0] else {
        panic!()
    };
    let read: Vec<&Element> = stanzas(&frames).into_iter().map(element).collect();
    assert_eq!(read.len(), 3);
    for (a, b) in read.iter().zip(&stanzas_in) {
        assert_same(a, b);
    }
    // A reader resumed from the header picks up at any boundary.
    let mut first = Reader::new(limits());
    first.feed(&out[..boundaries[0]]).unwrap();
    while first.next_frame().unwrap().is_some() {}
    assert!(first.at_boundary());
    let header = first.header_bytes().unwrap().to_vec();
    let mut resumed = Reader::resume(limits(), &header).unwrap();
    resumed.feed(&out[boundaries[0]..]).unwrap();
    let mut n = 0;
    while let Some(Frame::Stanza(i)) = resumed.next_frame().unwrap() {
        assert_same(element(&i), &stanzas_in[n + 1]);
        n += 1;
    }
    assert_eq!(n, 2);
}

/// Same name, namespace, attributes, text and children (text nodes may be split
/// differently).
fn assert_same(a: &Element, b: &Element) {
    assert_eq!((a.name(), a.ns()), (b.name(), b.ns()));
    let attrs = |e: &Element| {
        let mut v: Vec<(String, String)> = e
            .attrs()
            .iter()
            .map(|((ns, k), v)| (format!("{ns:?}{k}"), v.to_string()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(attrs(a), attrs(b));
    assert_eq!(a.text(), b.text());
    assert_eq!(a.children().count(), b.children().count());
    for (x, y) in a.children().zip(b.children()) {
        assert_same(x, y);
    }
}

#[test]
fn a_flood_of_small_stanzas_in_every_chunking() {
    let probe = "<presence type='probe' from='impl@localhost/a' to='proxy.localhost'/>";
    let mut bytes = HEADER.as_bytes().to_vec();
    bytes.extend_from_slice(b"<handshake/>");
    for _ in 0..300 {
        bytes.extend_from_slice(probe.as_bytes());
    }
    for chunk in 1..=150 {
        let frames =
            read_all(&bytes, chunk, limits()).unwrap_or_else(|e| panic!("chunk {chunk}: {e}"));
        assert_eq!(stanzas(&frames).len(), 301, "chunk {chunk}");
    }
}

#[test]
fn an_empty_element_past_the_depth_limit_counts() {
    let small = Limits {
        max_bytes: 4096,
        max_depth: 3,
        max_nodes: crate::inbound::MAX_NODES,
    };
    // Levels: iq 1, a 2, b 3, c 4 (empty).
    let bytes = stream_of(&[
        "<iq id='over'><a><b><c/></b></a></iq>".into(),
        "<iq id='within'><a><b/></a></iq>".into(),
    ]);
    let frames = read_all(&bytes, 5, small).unwrap();
    let s = stanzas(&frames);
    let Inbound::Oversized(o) = s[0] else {
        panic!("{:?}", s[0])
    };
    assert_eq!(o.exceeded, Exceeded::Depth(3));
    assert_eq!(element(s[1]).attr("id"), Some("within"));
}

#[test]
fn a_comment_or_pi_between_brackets_and_gt_is_not_a_cdata_end() {
    // Well-formed: `]]` and `>` are in two runs of text, separated by markup.
    let bytes = stream_of(&[
        "<message to='c.example'><body>]]<!-- x -->></body></message>".into(),
        "<message to='c.example'><body>]]<?pi x?>></body></message>".into(),
        "<message to='c.example'><body>]<?a?>]>x</body></message>".into(),
    ]);
    for chunk in [1, 4096] {
        let frames = read_all(&bytes, chunk, limits()).unwrap();
        let s = stanzas(&frames);
        assert_eq!(element(s[0]).children().next().unwrap().text(), "]]>");
        assert_eq!(element(s[1]).children().next().unwrap().text(), "]]>");
        assert_eq!(element(s[2]).children().next().unwrap().text(), "]]>x");
    }
}

#[test]
fn a_start_tag_over_the_limit_keeps_its_short_attributes() {
    let small = Limits {
        max_bytes: 4096,
        max_depth: 8,
        max_nodes: crate::inbound::MAX_NODES,
    };
    let big = "j".repeat(100_000);
    let spaces = " ".repeat(100_000);
    let bytes = stream_of(&[
        // The long attribute last, first, in the middle; long whitespace; and an element
        // name over the limit (nothing to keep).
        format!("<iq type='get' id='a' from='u@e/r' to='proxy.example' junk='{big}'/>"),
        format!(
            "<iq junk=\"{big}\" type='get' id='b' from='u@e/r' to='proxy.example'><q xmlns='urn:x'/></iq>"
        ),
        format!("<iq type='get' junk='{big}' id='c' from='u@e/r' to='proxy.example'>t</iq>"),
        format!("<iq type='get' id='d'{spaces}from='u@e/r' to='proxy.example'/>"),
        format!("<n{big}/>"),
        "<iq type='get' id='after' to='proxy.example'/>".into(),
    ]);
    for chunk in [1, 7, 4096] {
        let frames = read_all(&bytes, chunk, small).unwrap();
        let s = stanzas(&frames);
        assert_eq!(s.len(), 6);
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            let Inbound::Oversized(o) = s[i] else {
                panic!("{i}")
            };
            assert_eq!(o.exceeded, Exceeded::Bytes(4096));
            assert_eq!(o.ns, "jabber:component:accept");
            assert_eq!(o.name, "iq");
            assert_eq!(o.id.as_deref(), Some(id));
            assert_eq!(o.type_.as_deref(), Some("get"));
            assert_eq!(o.from.as_deref(), Some("u@e/r"));
            assert_eq!(o.to.as_deref(), Some("proxy.example"));
        }
        // Long whitespace: what came before it is kept.
        let Inbound::Oversized(o) = s[3] else {
            panic!()
        };
        assert_eq!((o.name.as_str(), o.id.as_deref()), ("iq", Some("d")));
        let Inbound::Oversized(o) = s[4] else {
            panic!()
        };
        assert_eq!(o.name, "");
        assert_eq!(element(s[5]).attr("id"), Some("after"));
    }
}

#[test]
fn a_start_tag_whose_attributes_end_at_the_limit_is_held_within_it() {
    // Found by the wire_raw fuzz target: attributes complete at exactly the byte limit, then
    // more of the tag; its summary, closed with a `>`, was held one byte over the limit.
    let small = Limits {
        max_bytes: 256,
        max_depth: 8,
        max_nodes: crate::inbound::MAX_NODES,
    };
    for pad in 180..260 {
        let a = "a".repeat(pad);
        let bytes = stream_of(&[
            format!("<iq type='get' id='x' from='u@e/r' p='{a}' q='1' r='2'><c/></iq>"),
            format!("<iq type='get' id='y' from='u@e/r' p='{a}'  q='{a}'/>"),
            "<iq type='get' id='after' to='proxy.example'/>".into(),
        ]);
        for chunk in [1, 3, 4096] {
            // `read_all` checks that what is held never exceeds the limit.
            let frames = read_all(&bytes, chunk, small).unwrap();
            let s = stanzas(&frames);
            assert_eq!(s.len(), 3, "pad {pad}");
            for (i, id) in ["x", "y"].into_iter().enumerate() {
                match s[i] {
                    Inbound::Oversized(o) => {
                        assert_eq!(o.name, "iq", "pad {pad}");
                        assert_eq!(o.id.as_deref(), Some(id), "pad {pad}");
                    }
                    Inbound::Element(e) => assert_eq!(e.attr("id"), Some(id), "pad {pad}"),
                }
            }
            assert_eq!(element(s[2]).attr("id"), Some("after"));
        }
    }
}

fn render(f: &Frame) -> String {
    match f {
        Frame::Header(h) => format!("header {h:?}"),
        Frame::Stanza(Inbound::Element(e)) => String::from(e),
        Frame::Stanza(Inbound::Oversized(o)) => format!("oversized {o:?}"),
        Frame::Footer => "footer".into(),
    }
}

/// The in-place upgrade's seam: at every byte where a reader says what is pending, a reader
/// resumed from its header and fed that, then the rest, reads exactly what the first one
/// would have read — whatever was cut (a name, a quoted value, a comment, a CDATA section,
/// an attribute of a prefixed namespace, the `<` of the next element).
#[test]
fn a_reader_hands_over_at_any_byte_it_says_it_can() {
    let small = Limits {
        max_bytes: 600,
        max_depth: 16,
        max_nodes: crate::inbound::MAX_NODES,
    };
    let big = "x".repeat(900);
    let bytes = stream_of(&[
        "<iq type='get' id='1' to='proxy.example' from='u@example/r'><q xmlns='urn:x' a=\"'>\"><!-- c --><![CDATA[<]]>t&amp;</q></iq>".into(),
        "<message to='proxy.example'><?pi x?><body>\u{1F980}</body></message>".into(),
        format!("<iq type='set' id='big' to='proxy.example'><q xmlns='urn:x'>{big}</q></iq>"),
        "<p:presence xmlns:p='jabber:component:accept' from='impl@example/a' to='proxy.example'/>".into(),
        "<iq type='result' id='2' to='proxy.example/T' from='impl@example/a'/>".into(),
    ]);
    let whole: Vec<String> = read_all(&bytes, bytes.len(), small)
        .unwrap()
        .iter()
        .map(render)
        .collect();
    assert_eq!(whole.len(), 7, "{whole:#?}");
    let mut handed = 0;
    for cut in 0..=bytes.len() {
        let mut first = Reader::new(small);
        first.feed(&bytes[..cut]).unwrap();
        let mut seen: Vec<String> = Vec::new();
        while let Some(f) = first.next_frame().unwrap() {
            seen.push(render(&f));
        }
        let Some(pending) = first.pending() else {
            continue;
        };
        handed += 1;
        let mut second = Reader::resume(small, first.header_bytes().unwrap()).unwrap();
        second.feed(&pending).unwrap();
        second.feed(&bytes[cut..]).unwrap();
        while let Some(f) = second.next_frame().unwrap() {
            seen.push(render(&f));
        }
        assert_eq!(seen, whole, "handed over at byte {cut}");
    }
    // Only inside the header and inside the element over the limit is there nothing to hand.
    assert!(
        handed >= bytes.len() - HEADER.len() - big.len() - 100,
        "handed over at {handed} of {} bytes",
        bytes.len()
    );
}

/// Both writer paths on `el`: the same bytes, or both refuse (the direct path then leaves
/// the element to the encoder).
fn same_as_encoder(el: &Element) -> Option<Vec<u8>> {
    let (mut direct, mut encoded) = (b"kept".to_vec(), b"kept".to_vec());
    let a = Writer::resumed().element(el, &mut direct);
    let b = Writer::resumed().element_by_encoder(el, &mut encoded);
    assert_eq!(
        String::from_utf8_lossy(&direct),
        String::from_utf8_lossy(&encoded),
        "{el:?}"
    );
    assert_eq!(a.is_ok(), b.is_ok(), "{el:?}: {a:?} / {b:?}");
    a.ok().map(|()| direct)
}

#[test]
fn the_direct_writer_writes_what_the_encoder_writes() {
    let shapes = [
        "<iq xmlns='jabber:component:accept' type='get' id='a&amp;b&lt;c&gt;&apos;&quot;' to='x@y/z' from='p.example'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
        "<message xmlns='jabber:component:accept' to='a@b'><body xml:lang='en'>tab\there\nline&#13;cr &amp; &lt;&gt; \"'</body><x xmlns='urn:x' a='&#9;&#10;&#13;'><y/><z xmlns='urn:z'>t<w xmlns='urn:x'/></z>text</x></message>",
        "<iq xmlns='jabber:client' to='a'><q xmlns='jabber:component:accept'/></iq>",
        "<presence xmlns='jabber:component:accept'><x xmlns='urn:a' xmlns:p='urn:p' p:attr='v' plain='w'/></presence>",
        "<iq xmlns='jabber:component:accept'><error xmlns='http://etherx.jabber.org/streams'/></iq>",
        "<iq xmlns='jabber:component:accept'><e xmlns='urn:&amp;&apos;'/>\u{10348}\u{fffd}\u{fffc}</iq>",
        "<a xmlns='jabber:component:accept'>\u{effe}\u{efbe}\u{ffbe}</a>",
    ];
    for (i, xml) in shapes.into_iter().enumerate() {
        let el: Element = xml.parse().expect(xml);
        let written = same_as_encoder(&el);
        assert!(written.is_some(), "{xml}");
        // The stanza shapes take the direct path; a prefixed attribute (other than `xml:`)
        // and an element in the stream's namespace are left to the encoder.
        let direct = super::writer::plain::element(&el, crate::stanza::NS, &mut Vec::new());
        assert_eq!(direct.is_some(), ![3, 4].contains(&i), "{xml}");
    }
    // Built elements: empty text, a child in no namespace, characters XML does not allow,
    // a name that is not XML.
    let built = [
        Element::builder("iq", crate::stanza::NS)
            .append(xmpp_parsers::minidom::Node::Text(String::new()))
            .build(),
        Element::builder("iq", crate::stanza::NS)
            .append(Element::bare("none", ""))
            .build(),
        Element::builder("iq", crate::stanza::NS)
            .attr(rxml::xml_ncname!("id").to_owned(), "a\u{1}b")
            .build(),
        Element::builder("iq", crate::stanza::NS)
            .append("x\u{fffe}y")
            .build(),
        Element::builder("iq", crate::stanza::NS)
            .append("x\u{ffff}")
            .build(),
        Element::builder("iq", crate::stanza::NS)
            .append("\u{0}")
            .build(),
        Element::bare("not a name", crate::stanza::NS),
        Element::bare("message", "urn:other"),
    ];
    for el in &built {
        same_as_encoder(el);
    }
    // Every single character, in text and in an attribute value.
    let mut ch = String::new();
    for cp in (0..0x800u32)
        .chain(0xd000..0x10000)
        .chain([0x10000, 0x10ffff])
    {
        let Some(c) = char::from_u32(cp) else {
            continue;
        };
        ch.clear();
        ch.push('a');
        ch.push(c);
        ch.push('b');
        same_as_encoder(
            &Element::builder("m", crate::stanza::NS)
                .attr(rxml::xml_ncname!("v").to_owned(), ch.as_str())
                .append(ch.as_str())
                .build(),
        );
    }
}
