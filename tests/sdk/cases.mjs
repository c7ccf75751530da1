// One call through each provider's official Node SDK, for tests/tests/sdks.rs: the Node
// twin of cases.py (read its comment). `node cases.mjs NAME`, with NODE_PATH-free imports
// resolved from the SDK project that scripts/test installs (the test runs this file from
// inside that project's directory).

const env = (name) => process.env[name];

const cases = {
  anthropic: async () => {
    const { default: Anthropic } = await import('@anthropic-ai/sdk');
    await new Anthropic({ maxRetries: 0 }).models.list();
  },
  groq: async () => {
    const { default: Groq } = await import('groq-sdk');
    await new Groq({ maxRetries: 0 }).models.list();
  },
  cerebras: async () => {
    const { default: Cerebras } = await import('@cerebras/cerebras_cloud_sdk');
    await new Cerebras({ maxRetries: 0, warmTCPConnection: false }).models.list();
  },
  together: async () => {
    const { default: Together } = await import('together-ai');
    await new Together({ maxRetries: 0 }).chat.completions.create({
      model: 'meta-llama/Llama-3-8b-chat-hf',
      messages: [{ role: 'user', content: 'hi' }],
    });
  },
  mistral: async () => {
    const { Mistral } = await import('@mistralai/mistralai');
    await new Mistral({ apiKey: env('MISTRAL_API_KEY') }).models.list();
  },
  cohere: async () => {
    const { CohereClientV2 } = await import('cohere-ai');
    await new CohereClientV2({ token: env('CO_API_KEY') }).models.list();
  },
  gemini: async () => {
    const { GoogleGenAI } = await import('@google/genai');
    await new GoogleGenAI({ apiKey: env('GEMINI_API_KEY') }).models.get({ model: 'gemini-2.0-flash' });
  },
  huggingface: async () => {
    const { whoAmI } = await import('@huggingface/hub');
    await whoAmI({ accessToken: env('HF_TOKEN') });
  },
  stripe: async () => {
    const { default: Stripe } = await import('stripe');
    await new Stripe(env('STRIPE_API_KEY'), { maxNetworkRetries: 0 }).customers.list();
  },
  slack: async () => {
    const { WebClient } = await import('@slack/web-api');
    await new WebClient(env('SLACK_BOT_TOKEN'), { retryConfig: { retries: 0 } }).auth.test();
  },
  notion: async () => {
    const { Client } = await import('@notionhq/client');
    await new Client({ auth: env('NOTION_TOKEN') }).users.me({});
  },
  github: async () => {
    const { Octokit } = await import('@octokit/rest');
    await new Octokit({ auth: env('GITHUB_TOKEN') }).users.getAuthenticated();
  },
  resend: async () => {
    const { Resend } = await import('resend');
    const { error } = await new Resend(env('RESEND_API_KEY')).domains.list();
    if (error) throw new Error(error.message);
  },
  replicate: async () => {
    const { default: Replicate } = await import('replicate');
    await new Replicate().models.get('owner', 'model');
  },
  linear: async () => {
    const { LinearClient } = await import('@linear/sdk');
    await new LinearClient({ apiKey: env('LINEAR_API_KEY') }).viewer;
  },
  tavily: async () => {
    const { tavily } = await import('@tavily/core');
    await tavily({ apiKey: env('TAVILY_API_KEY') }).search('broker');
  },
  exa: async () => {
    const { default: Exa } = await import('exa-js');
    await new Exa(env('EXA_API_KEY')).search('broker');
  },
  elevenlabs: async () => {
    const { ElevenLabsClient } = await import('@elevenlabs/elevenlabs-js');
    await new ElevenLabsClient({ maxRetries: 0 }).models.list();
  },
  deepgram: async () => {
    const { DeepgramClient } = await import('@deepgram/sdk');
    await new DeepgramClient({ apiKey: env('DEEPGRAM_API_KEY') }).manage.v1.projects.list();
  },
  sendgrid: async () => {
    const { default: client } = await import('@sendgrid/client');
    client.setApiKey(env('SENDGRID_API_KEY'));
    await client.request({ method: 'GET', url: '/v3/scopes' });
  },
};

const name = process.argv[2];
try {
  await cases[name]();
  console.log(`${name}: the call returned`);
} catch (error) {
  // The origin's `{}` is not a real answer: most SDKs throw.
  console.log(`${name}: the call raised ${error?.constructor?.name ?? typeof error}`);
  console.error(`${name}: ${String(error?.message ?? error).slice(0, 300)}`);
}
