from lowbit.cli.chat import chat_loop
from lowbit.runtime.sampling import SamplingParams


class FakeLLM:
    """Records the conversations it is asked to continue and answers from a script."""

    name = "fake"

    def __init__(self, interrupt_on=None):
        self.seen, self.interrupt_on = [], interrupt_on

    def encode_chat(self, messages):
        self.seen.append([dict(m) for m in messages])
        return [1, 2, 3]

    def stream_ids(self, ids, params):
        yield "Hello", None
        if self.interrupt_on == len(self.seen):
            raise KeyboardInterrupt
        yield " there", "stop"


def run(lines, llm):
    feed = iter(lines)
    out = []

    def read(prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError

    chat_loop(llm, SamplingParams(max_tokens=8), read=read, write=out.append)
    return "".join(out)


def test_multi_turn_history_and_reset():
    llm = FakeLLM()
    text = run(["hi", "again", "/reset", "fresh", "/exit"], llm)
    assert "Hello there" in text and "(conversation cleared)" in text
    assert [m["role"] for m in llm.seen[1]] == ["user", "assistant", "user"]
    assert llm.seen[1][1]["content"] == "Hello there"
    assert llm.seen[2] == [{"role": "user", "content": "fresh"}]


def test_ctrl_c_stops_the_answer_but_not_the_session():
    llm = FakeLLM(interrupt_on=1)
    text = run(["first", "second"], llm)
    assert "[stopped]" in text
    assert len(llm.seen) == 2 and llm.seen[1][1] == {"role": "assistant", "content": "Hello"}
