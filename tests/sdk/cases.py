"""One call through each provider's official Python SDK, for tests/tests/sdks.rs.

`python cases.py NAME` builds NAME's client the way its README shows, with the key taken from
the environment (where `broker run` put the placeholder), and makes one API call to the
provider's real hostname. The test's origin answers every request with `{}`, which most SDKs
then fail to parse: that is expected and not an error here. What the test checks is on the
origin's side: the request arrived, with the real key in it. An SDK that refused the
placeholder before sending (a prefix or length check) sends nothing, and the test says so.
"""

import os
import sys


def env(name):
    return os.environ[name]


def anthropic_():
    import anthropic
    anthropic.Anthropic(max_retries=0).models.list()


def groq_():
    import groq
    groq.Groq(max_retries=0).models.list()


def together_():
    import together
    together.Together(max_retries=0).chat.completions.create(
        model="meta-llama/Llama-3-8b-chat-hf", messages=[{"role": "user", "content": "hi"}]
    )


def cerebras_():
    from cerebras.cloud.sdk import Cerebras
    Cerebras(max_retries=0, warm_tcp_connection=False).models.list()


def mistral_():
    from mistralai.client import Mistral
    Mistral(api_key=env("MISTRAL_API_KEY")).models.list()


def cohere_():
    import cohere
    cohere.ClientV2().models.list()


def gemini_():
    from google import genai
    client = genai.Client()  # kept: a temporary's transport closes before the call
    client.models.get(model="gemini-2.0-flash")


def huggingface_():
    import huggingface_hub
    huggingface_hub.whoami()


def stripe_():
    import stripe
    stripe.StripeClient(env("STRIPE_API_KEY"), max_network_retries=0).v1.customers.list()


def slack_():
    from slack_sdk import WebClient
    WebClient(token=env("SLACK_BOT_TOKEN")).auth_test()


def tavily_():
    from tavily import TavilyClient
    TavilyClient().search("broker")


def exa_():
    from exa_py import Exa
    Exa(api_key=env("EXA_API_KEY")).search("broker")


def replicate_():
    import replicate
    replicate.Client().models.get("owner/model")


def voyage_():
    import voyageai
    voyageai.Client(max_retries=0).embed(["broker"], model="voyage-3")


def elevenlabs_():
    from elevenlabs.client import ElevenLabs
    ElevenLabs().models.list()


def deepgram_():
    from deepgram import DeepgramClient
    DeepgramClient(api_key=env("DEEPGRAM_API_KEY")).manage.v1.projects.list()


def resend_():
    import resend
    resend.Domains.list()


def sendgrid_():
    from sendgrid import SendGridAPIClient
    SendGridAPIClient(env("SENDGRID_API_KEY")).client.scopes.get()


def github_():
    from github import Auth, Github
    Github(auth=Auth.Token(env("GITHUB_TOKEN")), retry=None).get_user().login


def gitlab_():
    import gitlab
    gitlab.Gitlab("https://gitlab.com", private_token=env("GITLAB_TOKEN"), retry_transient_errors=False).auth()


def notion_():
    from notion_client import Client
    Client(auth=env("NOTION_TOKEN")).users.me()


def firecrawl_():
    from firecrawl import Firecrawl
    Firecrawl(api_key=env("FIRECRAWL_API_KEY")).scrape("https://example.com")


def langsmith_():
    import langsmith
    list(langsmith.Client().list_projects(limit=1))


def zhipu_():
    from zhipuai import ZhipuAI
    ZhipuAI(max_retries=0).chat.completions.create(model="glm-4", messages=[{"role": "user", "content": "hi"}])


def hetzner_():
    import hcloud
    hcloud.Client(token=env("HCLOUD_TOKEN")).servers.get_all()


def todoist_():
    from todoist_api_python.api import TodoistAPI
    api = TodoistAPI(env("TODOIST_API_TOKEN"))  # kept, as above
    next(iter(api.get_projects()))


def assemblyai_():
    import assemblyai
    assemblyai.settings.api_key = env("ASSEMBLYAI_API_KEY")
    assemblyai.Transcript.get_by_id("broker")


def writer_():
    import writerai
    writerai.Writer(max_retries=0).models.list()


def ai21_():
    from ai21 import AI21Client
    from ai21.models.chat import ChatMessage
    AI21Client().chat.completions.create(model="jamba-mini", messages=[ChatMessage(role="user", content="hi")])


def browserbase_():
    from browserbase import Browserbase
    Browserbase(max_retries=0).sessions.list()


def dashscope_():
    import dashscope
    dashscope.Generation.call(model="qwen-turbo", prompt="hi")


CASES = {name[:-1]: fn for name, fn in list(globals().items()) if name.endswith("_") and callable(fn)}


def main():
    name = sys.argv[1]
    try:
        CASES[name]()
        print(f"{name}: the call returned")
    except Exception as error:  # the origin's `{}` is not a real answer: most SDKs raise
        print(f"{name}: the call raised {type(error).__name__}")
        print(f"{name}: {str(error)[:300]} {error.__cause__!r}", file=sys.stderr)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
