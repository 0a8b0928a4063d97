"""WebShop adapter against a fake WebShop server: http.server in a thread that serves pages in
WebShop's own HTML shape (tests/fixtures/webshop/*.html, after web_agent_site/templates) and
follows WebShop's URL scheme (/<session>, /search_results/..., /item_page/..., /done/...)."""

import ast
import http.server
import socket
import threading
import urllib.parse
from pathlib import Path

import pytest

from envs import EnvError, check_env, make_env
from envs.webshop_env import parse_action, parse_page

FIXTURES = Path(__file__).parent / "fixtures" / "webshop"
TEMPLATES = {p.stem: p.read_text() for p in FIXTURES.glob("*.html")}
INSTRUCTION = "i need red running shoes in size large, and price lower than 30.00 dollars"
PRODUCTS = {  # asin -> (title, price)
    "B0RED00001": ("Red Running Shoes for Men", "$24.99"),
    "B0BLUE0002": ("Blue Running Shoes", "$19.99"),
    "B0RED00003": ("Red Wool Socks", "$5.00"),
}
GOAL_ASIN, GOAL_OPTIONS = "B0RED00001", {"size": "large"}
PER_PAGE = 2


def _q(value) -> str:
    return urllib.parse.quote(str(value), safe="")


class FakeWebShop(http.server.BaseHTTPRequestHandler):
    requests: list[tuple[str, str]] = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        self._route("GET")

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        self._route("POST")

    def _send(self, html: str, status: int = 200, location: str | None = None):
        body = html.encode()
        self.send_response(status)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self, method: str):
        FakeWebShop.requests.append((method, self.path))
        parts = [urllib.parse.unquote(p) for p in self.path.strip("/").split("/")]
        if len(parts) == 1:
            session = parts[0]
            if method == "POST" and "search_query" in getattr(self, "form", {}):
                keywords = self.form["search_query"][0].lower().split(" ")
                return self._send("", 302, f"/search_results/{session}/{_q(keywords)}/1")
            return self._send(TEMPLATES["search_page"].format(instruction=INSTRUCTION, session=session))
        kind, session = parts[0], parts[1]
        if kind == "search_results":
            return self._send(self._results(session, ast.literal_eval(parts[2]), int(parts[3])))
        if kind == "item_page":
            asin, keywords, page, options = parts[2], parts[3], parts[4], ast.literal_eval(parts[5])
            return self._send(self._item(session, asin, keywords, page, options))
        if kind == "item_sub_page":
            return self._send(f"<html><body><h4>Instruction: {INSTRUCTION}</h4><p>Comfortable shoes.</p>"
                              f"<form method='post' action='/{session}'><button>Back to Search</button></form>"
                              "</body></html>")
        if kind == "done" and method == "POST":
            asin, options = parts[2], ast.literal_eval(parts[3])
            reward = 1.0 if (asin, options) == (GOAL_ASIN, GOAL_OPTIONS) else 0.5 if asin == GOAL_ASIN else 0.0
            return self._send(TEMPLATES["done_page"].format(session=session, asin=asin, options=options,
                                                            goal_asin=GOAL_ASIN, reward=reward))
        self._send("not found", 404)

    def _results(self, session, keywords, page):
        hits = [a for a, (title, _) in PRODUCTS.items() if set(keywords) & set(title.lower().split())]
        shown = hits[(page - 1) * PER_PAGE : page * PER_PAGE]
        items = "".join(TEMPLATES["result_item"].format(
            image="img.jpg", asin=a, title=PRODUCTS[a][0], price=PRODUCTS[a][1],
            url=f"/item_page/{session}/{a}/{_q(keywords)}/{page}/{_q({})}") for a in shown)
        nav = ""
        if page > 1:
            nav += (f'<form method="post" action="/search_results/{session}/{_q(keywords)}/{page - 1}">'
                    '<button type="submit" class="btn btn-primary">&lt; Prev</button></form>')
        if page * PER_PAGE < len(hits):
            nav += (f'<form method="post" action="/search_results/{session}/{_q(keywords)}/{page + 1}">'
                    '<button type="submit" class="btn btn-primary">Next &gt;</button></form>')
        return TEMPLATES["results_page"].format(
            instruction=INSTRUCTION, query=" ".join(keywords), page=page, first=(page - 1) * 10 + 1,
            last=page * 10, total=len(hits), session=session, nav=nav, items=items)

    def _item(self, session, asin, keywords, page, options):
        base = f"/item_page/{session}/{asin}/{_q(keywords)}/{page}"
        radios = "".join(
            f'<input type="radio" id="radio_size{i}" name="size" value="{size}" '
            f'data-url="{base}/{_q({**options, "size": size})}">'
            f'<label for="radio_size{i}">{size}</label>' for i, size in enumerate(("small", "large")))
        return TEMPLATES["item_page"].format(
            instruction=INSTRUCTION, query=keywords, session=session, image="img.jpg", radios=radios,
            title=PRODUCTS[asin][0], price=PRODUCTS[asin][1],
            results_url=f"/search_results/{session}/{_q(keywords)}/{page}",
            description_url=f"/item_sub_page/{session}/{asin}/{_q(keywords)}/{page}/Description/{_q(options)}",
            buy_url=f"/done/{session}/{asin}/{_q(options)}")


@pytest.fixture(scope="module")
def server_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeWebShop)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def env(server_url):
    return make_env("webshop", server_url=server_url, max_steps=8, max_tasks_per_split=3)


def test_parse_action():
    assert parse_action("search[red running shoes]") == "search[red running shoes]"
    assert parse_action("Thought: buy it\nAction: Click[ Buy Now ]") == "click[Buy Now]"
    assert parse_action("> click[< Prev]") == "click[< Prev]"
    assert parse_action("`click[B0RED00001]`") == "click[B0RED00001]"
    assert parse_action("click[]") is None
    assert parse_action("buy[shoes]") is None
    assert parse_action("search red shoes") is None
    assert parse_action("") is None


def test_parse_page_shapes():
    page = parse_page(TEMPLATES["search_page"].format(instruction=INSTRUCTION, session="fixed_1"),
                      "http://h:3000/fixed_1")
    assert page.search_url == "http://h:3000/fixed_1" and page.clickables == {} and page.reward is None
    assert page.text == f"WebShop\nInstruction:\n{INSTRUCTION}\n[Search]"
    done = parse_page(TEMPLATES["done_page"].format(session="s", asin="A", options={}, goal_asin="B",
                                                    reward=0.25), "http://h/done/s/A/%7B%7D")
    assert done.reward == 0.25 and "B" not in done.text.split("\n")  # the hidden target stays hidden
    assert done.text.endswith("Your score (min 0.0, max 1.0)\n0.25")


def test_splits(env):
    assert env.tasks("test") == ["fixed_0", "fixed_1", "fixed_2"]
    assert env.tasks("dev") == ["fixed_500", "fixed_501", "fixed_502"]
    assert env.tasks("train") == ["fixed_1500", "fixed_1501", "fixed_1502"]
    full = make_env("webshop", server_url=env.server_url)
    sizes = {s: set(full.tasks(s)) for s in ("train", "dev", "test")}
    assert [len(sizes[s]) for s in ("train", "dev", "test")] == [10587, 1000, 500]
    assert not (sizes["train"] & sizes["dev"]) and not (sizes["train"] & sizes["test"])
    with pytest.raises(EnvError, match="split 'valid'"):
        env.tasks("valid")
    with pytest.raises(EnvError, match="task 'shoes'"):
        env.reset("shoes")


def test_winning_episode(env):
    FakeWebShop.requests.clear()
    obs, info = env.reset("fixed_3")
    assert FakeWebShop.requests == [("GET", "/fixed_3")]
    assert INSTRUCTION in obs and info["has_search"] and info["score"] == 0.0
    obs, reward, done, info = env.step("search[red running shoes]")
    assert info["valid"] and not done and reward == 0.0
    assert "[B0RED00001]" in obs and "[B0BLUE0002]" in obs and "[Next >]" in obs
    assert "B0GHOST000" not in obs  # inside an HTML comment
    assert set(info["clickables"]) == {"back to search", "next >", "b0red00001", "b0blue0002"}
    obs, _, _, info = env.step("click[Next >]")
    assert info["valid"] and "[B0RED00003]" in obs and "[< Prev]" in obs
    obs, _, _, info = env.step("click[< Prev]")
    obs, _, _, info = env.step("click[b0red00001]")  # product ids match case-insensitively
    assert info["valid"] and "Red Running Shoes for Men" in obs and "[Buy Now]" in obs
    assert "[small]" in obs and "[large]" in obs and not info["has_search"]
    obs, _, _, info = env.step("click[large]")
    assert info["valid"] and FakeWebShop.requests[-1][1].endswith(urllib.parse.quote(str(GOAL_OPTIONS), safe=""))
    assert "[[large]]" in obs and "[small]" in obs
    obs, reward, done, info = env.step("Action: click[Buy Now]")
    assert done and info["valid"] and info["won"] and reward == 1.0 and info["score"] == 1.0
    assert FakeWebShop.requests[-1][0] == "POST" and FakeWebShop.requests[-1][1].startswith("/done/fixed_3/B0RED00001/")


def test_partial_reward_and_invalid_actions(env):
    env.reset("fixed_0")
    obs, reward, done, info = env.step("click[Buy Now]")  # no such button on the search page
    assert not info["valid"] and not done and reward == 0.0 and obs.startswith("Invalid action")
    env.step("search[red shoes]")
    obs, _, _, info = env.step("search[blue shoes]")  # the results page has no search bar
    assert not info["valid"] and "[B0RED00001]" in obs
    _, _, _, info = env.step("I would like to buy the red shoes")
    assert not info["valid"]
    env.step("click[B0RED00001]")
    obs, reward, done, info = env.step("click[Buy Now]")  # no size chosen: half the reward
    assert done and info["valid"] and not info["won"] and reward == 0.5 and info["score"] == 0.5
    with pytest.raises(RuntimeError, match="reset"):
        env.step("click[Buy Now]")


def test_truncation_and_check_env(env):
    check_env(env, "test", max_tasks=2)
    env.reset("fixed_1")
    for i in range(8):
        _, reward, done, info = env.step("click[nothing]")
    assert done and info["truncated"] and info["score"] == 0.0 and reward == 0.0


def test_missing_server_names_what_to_run():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(EnvError, match=r"env.server_url=.*no WebShop server reachable.*web_agent_site.app"):
        make_env("webshop", server_url=f"http://127.0.0.1:{port}")
    with pytest.raises(EnvError, match="env.server_url='localhost:3000'"):
        make_env("webshop", server_url="localhost:3000")
