#!/usr/bin/env python3
"""Drive a running deepseek-engine with the official `openai` Python client, unchanged.

    deepseek-engine serve --port 8000 &
    pip install openai && python3 scripts/openai_client_check.py --base-url http://127.0.0.1:8000/v1

Checks: list models; chat (plain and streamed, with usage); reasoning through thinking mode;
a tools request round trip (the request with tools and a tool result is accepted; whether the
model chooses to call a tool depends on its weights); completions; and an OpenAI-shaped error.
"""

import argparse
import sys

import openai


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key="unused")

    models = client.models.list()
    model = models.data[0].id
    print("models:", [m.id for m in models.data])

    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, seed=1)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens <= 8
    print("chat:", repr(chat.choices[0].message.content), chat.choices[0].finish_reason)

    pieces, usage = [], None
    for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True,
            stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
    assert usage is not None and usage.completion_tokens <= 8
    print("stream:", repr("".join(pieces)), usage.completion_tokens, "tokens")

    thinking = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Think first."}], max_tokens=8,
        extra_body={"chat_template_kwargs": {"thinking": True}})
    msg = thinking.choices[0].message
    print("reasoning_content:", repr((msg.model_extra or {}).get("reasoning_content")))

    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    ]
    tooled = client.chat.completions.create(model=model, messages=history, tools=tools, max_tokens=8)
    print("tools:", tooled.choices[0].finish_reason, tooled.choices[0].message.tool_calls)

    comp = client.completions.create(model=model, prompt="Once upon", max_tokens=6)
    print("completion:", repr(comp.choices[0].text), comp.choices[0].finish_reason)

    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        sys.exit("an unknown model must be refused")
    except openai.NotFoundError as e:
        print("unknown model ->", e.status_code, e.body.get("code") if isinstance(e.body, dict) else e.body)
    print("ok")


if __name__ == "__main__":
    main()
