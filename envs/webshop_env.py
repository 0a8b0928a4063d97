"""WebShop (Yao et al., 2022) through its HTTP interface: find and buy the product an instruction
describes, on a simulated shopping site.

WebShop runs as a Flask server (`python -m web_agent_site.app` from a WebShop checkout, port
3000). Each task is a fixed goal, served at `<server_url>/fixed_<n>`; the pages carry every
follow-up URL (search form, product links, option radios, buttons), so this adapter only follows
links found in the HTML: it never builds WebShop URLs itself and works with any server that
renders WebShop's templates.

Actions: `search[<query>]` (only where the page has the search bar) and `click[<text>]` where
<text> is one of the clickables listed in the observation as [text] (buttons such as Buy Now,
Next >, < Prev, Back to Search, Description; product ids; option values, the chosen one shown
as [[value]]). An action that matches
nothing on the page is invalid (`info["valid"]` False) and leaves the page unchanged.
The episode ends on the done page after "Buy Now"; `info["score"]` is WebShop's reward in
[0, 1] read from that page, `info["won"]` is reward == 1 (WebShop's success rate).

Splits follow the WebShop baselines: goals 0-499 test, 500-1499 dev, 1500-12086 train.
There is no offline expert (the human demonstrations are a separate download).
"""

from __future__ import annotations

import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

from envs.base import EnvError, register

SPLIT_GOALS = {"test": (0, 500), "dev": (500, 1500), "train": (1500, 12087)}
_ACTION_RE = re.compile(r"^\s*(search|click)\s*\[(.*)\]\s*$", re.IGNORECASE)
_HIDDEN_TAGS = {"script", "style", "head", "title", "iframe", "noscript"}
_VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


def parse_action(reply: str) -> str | None:
    """First line of the form 'search[...]' or 'click[...]' (an 'Action:' prefix is allowed),
    as '<verb>[<arg>]' with the verb lower-cased and the argument stripped; None otherwise."""
    for line in reply.strip().splitlines():
        text = re.sub(r"^\s*(action\s*:|>)\s*", "", line.strip(), flags=re.IGNORECASE).strip(" `")
        match = _ACTION_RE.match(text)
        if match and match.group(2).strip():
            return f"{match.group(1).lower()}[{match.group(2).strip()}]"
    return None


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


@dataclass
class Page:
    """One WebShop page as the policy sees it and as the adapter can act on it."""

    text: str  # visible text, one chunk per line, clickables written as [text]
    clickables: dict[str, tuple[str, str]] = field(default_factory=dict)  # normalised text -> (method, url)
    search_url: str | None = None  # the search form's action URL; None when the page has no search bar
    reward: float | None = None  # the done page's reward


class _PageParser(HTMLParser):
    """Collects visible text and the clickables of a WebShop page (stdlib parser, no bs4)."""

    def __init__(self, base_url: str):
        super().__init__(convert_charrefs=True)
        self.base_url = base_url
        self.stack: list[tuple[str, dict[str, str], bool]] = []  # (tag, attrs, hidden)
        self.lines: list[str] = []
        self.page = Page(text="")
        self.radio_urls: dict[str, str] = {}  # input id -> its data-url (option radios)
        self.reward_text: list[str] = []

    def _hidden(self) -> bool:
        return bool(self.stack) and self.stack[-1][2]

    def _enclosing(self, tag: str) -> dict[str, str] | None:
        for name, attrs, _ in reversed(self.stack):
            if name == tag:
                return attrs
        return None

    def handle_starttag(self, tag: str, attrs_list: list) -> None:
        attrs = {k: v or "" for k, v in attrs_list}
        if tag == "input":
            if attrs.get("id") == "search_input":
                form = self._enclosing("form")
                if form is not None:
                    form["data-search-form"] = "1"  # its submit button is search[...], not a click
                self.page.search_url = urllib.parse.urljoin(self.base_url, (form or {}).get("action", ""))
            elif attrs.get("type") == "radio" and "data-url" in attrs:
                self.radio_urls[attrs.get("id", "")] = urllib.parse.urljoin(self.base_url, attrs["data-url"])
        if tag in _VOID_TAGS:
            return
        hidden = (self._hidden() or tag in _HIDDEN_TAGS or "hidden" in attrs
                  or "display:none" in attrs.get("style", "").replace(" ", ""))
        self.stack.append((tag, attrs, hidden))

    def handle_endtag(self, tag: str) -> None:
        # WebShop's templates have unbalanced tags (e.g. <h4>...</p>): pop to the match, if any.
        if any(name == tag for name, _, _ in self.stack):
            while self.stack and self.stack.pop()[0] != tag:
                pass

    def handle_data(self, data: str) -> None:
        text = " ".join(data.split())
        if self._enclosing("h3") is not None and self._enclosing("h3").get("id") == "reward":
            self.reward_text.append(text)
        if not text or self._hidden():
            return
        tag, attrs, _ = self.stack[-1] if self.stack else ("", {}, False)
        target = None
        if tag == "button" or self._enclosing("button") is not None:
            form = self._enclosing("form")
            if form is not None and "data-search-form" not in form:
                method = form.get("method", "get").upper()
                target = (method, urllib.parse.urljoin(self.base_url, form.get("action", "")))
            elif form is not None:
                self.lines.append(f"[{text}]")
                return
        elif tag == "a" and "product-link" in attrs.get("class", "").split():
            target = ("GET", urllib.parse.urljoin(self.base_url, attrs.get("href", "")))
        elif tag == "label" and attrs.get("for") in self.radio_urls:
            target = ("GET", self.radio_urls[attrs["for"]])
        if target is None:
            self.lines.append(text)
        elif tag == "label" and f"'{text}'" in urllib.parse.unquote(self.base_url):
            self.lines.append(f"[[{text}]]")  # the chosen option: the page URL carries the options dict
            self.page.clickables.setdefault(normalise(text), target)
        else:
            self.lines.append(f"[{text}]")
            self.page.clickables.setdefault(normalise(text), target)


def parse_page(html: str, url: str) -> Page:
    """WebShop HTML -> Page: visible text with [clickables], their targets, search bar, reward."""
    parser = _PageParser(url)
    parser.feed(html)
    parser.close()
    page = parser.page
    page.text = "\n".join(parser.lines)
    numbers = re.findall(r"-?\d+(?:\.\d+)?", " ".join(parser.reward_text).split(")")[-1])
    if numbers:
        page.reward = float(numbers[-1])
    return page


@register("webshop")
class WebShopEnv:
    """Options:
    - `server_url`: base URL of a running WebShop server (`python -m web_agent_site.app`).
    - `max_steps`: episode length limit (`info["truncated"]` is set when hit).
    - `max_tasks_per_split`: keep only the first N goals of each split (0 = all).
    - `timeout_s`: HTTP timeout per request (the first request loads WebShop's search index).
    """

    system_prompt = (
        "You are shopping on WebShop. Find and buy the product that matches the instruction "
        "(attributes, options such as size or colour, and price). Reply with exactly one action "
        "per turn: search[<keywords>] on a page with a search bar, or click[<item>] where <item> "
        "is one of the bracketed items on the current page, e.g. click[B07XYZ1234], click[large], "
        "click[Buy Now], click[Next >], click[< Prev], click[Back to Search]."
    )

    def __init__(self, server_url: str = "http://localhost:3000", max_steps: int = 15,
                 max_tasks_per_split: int = 0, timeout_s: float = 60.0):
        parts = urllib.parse.urlsplit(server_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EnvError(f"env.server_url={server_url!r}: expected e.g. 'http://localhost:3000'")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            socket.create_connection((parts.hostname, port), timeout=5).close()
        except OSError as e:
            raise EnvError(
                f"env.server_url={server_url!r}: no WebShop server reachable ({e}). Install WebShop "
                "(git clone https://github.com/princeton-nlp/WebShop; ./setup.sh -d small) and start "
                "it with `python -m web_agent_site.app` (port 3000), or set env.server_url=<its URL>"
            ) from None
        self.server_url = server_url.rstrip("/")
        self.max_steps = max_steps
        self.max_tasks_per_split = max_tasks_per_split
        self.timeout_s = timeout_s
        self.page: Page | None = None

    def tasks(self, split: str) -> list[str]:
        if split not in SPLIT_GOALS:
            raise EnvError(f"webshop split {split!r}: choose one of {sorted(SPLIT_GOALS)}")
        lo, hi = SPLIT_GOALS[split]
        if self.max_tasks_per_split:
            hi = min(hi, lo + self.max_tasks_per_split)
        return [f"fixed_{i}" for i in range(lo, hi)]

    def parse_action(self, reply: str) -> str | None:
        return parse_action(reply)

    def _fetch(self, method: str, url: str, form: dict[str, str] | None = None) -> Page:
        data = urllib.parse.urlencode(form).encode() if form is not None else (b"" if method == "POST" else None)
        request = urllib.request.Request(url, data=data, method=method)
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # follows redirects
            html = response.read().decode("utf-8", errors="replace")
            return parse_page(html, response.geturl())

    def _info(self, valid: bool, truncated: bool = False) -> dict[str, Any]:
        reward = self.page.reward if self.page and self.page.reward is not None else 0.0
        score = min(1.0, max(0.0, reward))
        return {"valid": valid, "won": score >= 1.0, "score": score, "truncated": truncated,
                "clickables": sorted(self.page.clickables) if self.page else [],
                "has_search": bool(self.page and self.page.search_url)}

    def reset(self, task: str) -> tuple[str, dict[str, Any]]:
        match = re.fullmatch(r"fixed_(\d+)", task)
        if not match or not any(lo <= int(match.group(1)) < hi for lo, hi in SPLIT_GOALS.values()):
            raise EnvError(f"webshop task {task!r}: expected 'fixed_<n>' with 0 <= n < 12087")
        self.page = self._fetch("GET", f"{self.server_url}/{task}")
        self.steps, self.done = 0, False
        return self.page.text, self._info(True)

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self.page is None or self.done:
            raise RuntimeError("webshop: call reset(task) before step()")
        self.steps += 1
        command = parse_action(action)
        target = None
        if command is not None:
            verb, arg = command[: command.index("[")], command[command.index("[") + 1 : -1]
            if verb == "search" and self.page.search_url:
                target = ("POST", self.page.search_url, {"search_query": arg})
            elif verb == "click" and normalise(arg) in self.page.clickables:
                target = (*self.page.clickables[normalise(arg)], None)
        if target is None:
            obs = f"Invalid action {action.strip()[:80]!r}: nothing on this page matches it.\n{self.page.text}"
            valid = False
        else:
            self.page = self._fetch(*target)
            obs, valid = self.page.text, True
        self.done = self.page.reward is not None
        truncated = not self.done and self.steps >= self.max_steps
        info = self._info(valid, truncated)
        reward = info["score"] if self.done else 0.0
        self.done = self.done or truncated
        return obs, reward, self.done, info

    def close(self) -> None:
        self.page = None
