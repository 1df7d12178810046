"""The texts a probe of a text model runs: the precision probe, and the check that cutting
long texts is exact for a tokenizer. Torch-free."""

# Short and long, prose, questions, lists, code, numbers, other scripts: what a probe of a
# text model's numerics should cover. Pairs for a reranker are (text i, text i + 1).
PROBE_TEXTS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password if I no longer have access to my email?",
    "Paris is the capital and most populous city of France.",
    "A dynamic batcher groups requests that arrive close together into one forward pass.",
    "Error 504: the upstream server did not answer in time.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "def add(a, b):\n    return a + b",
    "SELECT name, count(*) FROM orders GROUP BY name ORDER BY 2 DESC LIMIT 10;",
    "The meeting moved to Thursday at 3 pm; bring the quarterly figures.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "El aprendizaje automático permite a las computadoras aprender de los datos.",
    "東京は日本の首都であり、世界最大の都市圏の一つです。",
    "Москва — столица России и крупнейший город страны.",
    "What is the boiling point of water at sea level in Fahrenheit?",
    "I loved this film: the acting, the music, and an ending nobody saw coming!",
    "Terrible service. The package arrived broken and nobody answered my emails.",
    "3.14159 26535 89793 23846 26433 83279 50288 41971",
    "Ingredients: 2 eggs, 200 g flour, 1 cup of milk, a pinch of salt.",
    "The defendant's motion to dismiss was denied by the court of appeals.",
    "Patients with type 2 diabetes were given metformin twice daily for twelve weeks.",
    "Breaking: markets fall as central banks signal further interest rate increases.",
    "ok",
    "Why is the sky blue?",
    "To be, or not to be, that is the question.",
    "GPU memory usage climbed to 78 GiB before the out-of-memory error at batch 512.",
    "Please summarise the attached report in three bullet points for the board.",
    "The mitochondria is the powerhouse of the cell.",
    "Cats sleep for twelve to sixteen hours a day, more than most other mammals.",
    "Install the package, set the environment variable, and restart the service.",
    "In 1969, Apollo 11 landed the first humans on the Moon.",
    " ".join(
        "Long inputs matter too: attention over hundreds of tokens accumulates rounding "
        "error differently from a short sentence, so the probe includes one.".split()
        * 8
    ),
    "#hashtag @mention https://example.com/path?query=1 :) <b>bold</b> &amp;",
)
