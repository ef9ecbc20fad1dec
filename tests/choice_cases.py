"""Hand-written records of the eight commonsense tasks in their Hugging Face formats, with the
(context, continuation) requests and gold index lm-evaluation-harness makes of them (its task YAMLs:
super_glue/boolq, piqa, siqa, hellaswag + utils.py, winogrande + preprocess_winogrande.py, arc,
openbookqa; zero-shot context = doc_to_text, continuation = " " + choice; WinoGrande: one context
per option, shared continuation). Used by the data-check tests and the lm-eval agreement tests."""

CASES = {
    "boolq": (
        {"passage": "Ethanol fuel is ethyl alcohol.", "question": "is ethanol an alcohol", "label": 1, "idx": 0},
        [("Ethanol fuel is ethyl alcohol.\nQuestion: is ethanol an alcohol?\nAnswer:", " no"),
         ("Ethanol fuel is ethyl alcohol.\nQuestion: is ethanol an alcohol?\nAnswer:", " yes")],
        1,
    ),
    "piqa": (
        {"goal": "How do I dry a shirt?", "sol1": "Hang it up.", "sol2": "Put it in the fridge.", "label": 0},
        [("Question: How do I dry a shirt?\nAnswer:", " Hang it up."), ("Question: How do I dry a shirt?\nAnswer:", " Put it in the fridge.")],
        0,
    ),
    "social_iqa": (
        {"context": "Tracy stayed out late.", "question": "How would Tracy feel?", "answerA": "tired", "answerB": "bored", "answerC": "hungry", "label": "1"},
        [("Q: Tracy stayed out late. How would Tracy feel?\nA:", f" {a}") for a in ("tired", "bored", "hungry")],
        0,
    ),
    "hellaswag": (
        {"activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.", "ctx_b": "then",
         "endings": [", the man adds wax.", "Get a scraper [title] Scrape the car [step] Gently.", "he leaves.", "the man continues."], "label": "3"},
        [("Removing ice from car: Then, the man writes over the snow. Then", c)
         for c in (" , the man adds wax.", " Get a scraper. Scrape the car Gently.", " he leaves.", " the man continues.")],
        3,
    ),
    "winogrande": (
        {"sentence": "Sarah was a better surgeon than Maria so _ always got the easier cases.", "option1": "Sarah", "option2": "Maria", "answer": "2"},
        [("Sarah was a better surgeon than Maria so Sarah", " always got the easier cases."),
         ("Sarah was a better surgeon than Maria so Maria", " always got the easier cases.")],
        1,
    ),
    "arc_easy": (
        {"id": "q1", "question": "Which gas do plants take in?", "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["1", "2", "3"]}, "answerKey": "2"},
        [("Question: Which gas do plants take in?\nAnswer:", f" {t}") for t in ("oxygen", "carbon dioxide", "helium")],
        1,
    ),
    "arc_challenge": (
        {"id": "q2", "question": "What melts ice?", "choices": {"text": ["heat", "cold", "dark", "wind"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
        [("Question: What melts ice?\nAnswer:", f" {t}") for t in ("heat", "cold", "dark", "wind")],
        0,
    ),
    "openbookqa": (
        {"id": "7", "question_stem": "The sun is responsible for", "choices": {"text": ["puppies", "plants sprouting", "rain", "snow"], "label": ["A", "B", "C", "D"]}, "answerKey": " B"},
        [("The sun is responsible for", f" {t}") for t in ("puppies", "plants sprouting", "rain", "snow")],
        1,
    ),
}
