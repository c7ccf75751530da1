"""Plays the user's browser for broker's login tests: opens a URL, then submits every form the
OAuth server shows (hidden inputs kept, any login and password), following redirects with
cookies, until a page has no form. Python standard library only.

Usage: browser.py URL [--tamper-state]
  --tamper-state  do not follow the final redirect to the loopback callback as is: change its
                  `state` first (what a cross-site request forgery would look like)
Prints the final URL and the first line of the final page; exits 0 when a page was reached.
"""
import html
import http.cookiejar
import re
import sys
import urllib.parse
import urllib.request

url = sys.argv[1]
tamper = "--tamper-state" in sys.argv[2:]


class Redirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urljoin(req.full_url, newurl)
        parsed = urllib.parse.urlparse(target)
        if tamper and parsed.hostname == "127.0.0.1" and "state=" in (parsed.query or "") \
                and parsed.path == "/callback":
            q = urllib.parse.parse_qs(parsed.query)
            q["state"] = ["forged-" + q["state"][0][::-1]]
            target = parsed._replace(query=urllib.parse.urlencode(q, doseq=True)).geturl()
        return super().redirect_request(req, fp, code, msg, headers, target)


jar = http.cookiejar.CookieJar()
opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), Redirects())


def fetch(url, data=None):
    try:
        r = opener.open(url, data=data, timeout=20)
        return r.geturl(), r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.geturl(), e.code, e.read().decode("utf-8", "replace")


final, status, body = fetch(url)
for _ in range(10):
    form = re.search(r"<form\b([^>]*)>(.*?)</form>", body, re.S | re.I)
    if not form:
        break
    action = re.search(r'action="([^"]*)"', form.group(1))
    action = urllib.parse.urljoin(final, html.unescape(action.group(1)) if action else final)
    fields = {}
    for inp in re.finditer(r"<input\b([^>]*)>", form.group(2), re.I):
        attrs = dict((k.lower(), html.unescape(v)) for k, v in re.findall(r'(\w+)="([^"]*)"', inp.group(1)))
        name = attrs.get("name")
        if not name:
            continue
        value = attrs.get("value", "")
        if not value and name in ("login", "password"):
            value = "agent-tester"
        fields[name] = value
    final, status, body = fetch(action, urllib.parse.urlencode(fields).encode())

text = re.sub(r"<[^>]+>", " ", body)
print(final)
print(status, " ".join(text.split())[:200])
sys.exit(0 if status < 500 else 1)
