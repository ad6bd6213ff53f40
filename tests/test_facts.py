"""Fact accuracy on literal cases: which facts a reference holds, and which answers state them."""

import pytest

from slmtune.facts import check_answer, extract_facts, key_facts, normalise, stated_facts, subject_names


def facts(reference, question=""):
    return [fact.text for fact in extract_facts(reference, question)]


@pytest.mark.parametrize(
    ("reference", "question", "expected"),
    [
        ("CareWell Gold has an annual deductible of 250 euros.", "What is the Gold plan's deductible?", ["250 euros"]),
        ("Lumora matches pension contributions up to 6% of your salary.", "", ["6 percent"]),
        (
            "You can carry over up to 5 unused days into the next year, and they must be used by 31 March.",
            "What happens to vacation days I don't use?",
            ["5 unused days", "31 march"],
        ),
        (
            "Report it to IT Security within 1 hour at security@lumora.example or extension 4400.",
            "How do I report a stolen laptop?",
            ["security@lumora.example", "1 hour", "4400", "IT Security"],
        ),
        ("Core hours are 10:00 to 15:00; outside them you can schedule your day freely.", "", ["10:00", "15:00"]),
        ("Each employee has a learning budget of 1,200 euros per year.", "", ["1200 euros"]),
        ("Salaries are paid on the 25th of each month.", "When is payday?", ["25"]),
        # names the question already contains are not key facts; a sentence's plain first word is no name
        ("Request software through the ServiceDesk portal.", "How do I use the ServiceDesk?", []),
        ("Lumora offers two plans: CareWell Silver and CareWell Gold.", "", ["CareWell Silver", "CareWell Gold"]),
        ("You can work from home on Tuesday and Thursday.", "", ["Tuesday", "Thursday"]),
        # a number word is no bare-number fact ("one-time"), a number the question holds is none either
        ("Lumora gives a one-time allowance.", "", []),
        ("Yes, 12 of them.", "Are there 12 holidays?", []),
        ("Book economy for flights under 6 hours.", "", ["6 hours"]),
        ("Overtime is paid at 1.5 times the hours worked.", "", ["1.5"]),
        (
            "Visit https://intranet.lumora.example/benefits for details.",
            "",
            ["https://intranet.lumora.example/benefits"],
        ),
    ],
)
def test_key_facts_extracted_from_a_reference(reference, question, expected):
    assert facts(reference, question) == expected


@pytest.mark.parametrize(
    ("answer", "right"),
    [
        ("CareWell Gold has an annual deductible of 250 euros.", True),
        ("It is €250 a year.", True),
        ("The deductible is EUR 250.", True),
        ("250 euro per year", True),
        # wrong: a different number next to the right unit, a longer number, another unit, no number
        ("CareWell Gold has an annual deductible of 450 euros.", False),
        ("The deductible is 1250 euros.", False),
        ("The deductible is 250 dollars.", False),
        ("The deductible is 2.50 euros.", False),
        ("The deductible is low.", False),
        ("You pay 250 before 100 euros.", False),
    ],
)
def test_an_answer_is_right_only_with_the_right_number_and_unit(answer, right):
    reference = extract_facts("CareWell Gold has an annual deductible of 250 euros.", "What is the Gold deductible?")
    assert check_answer(answer, reference).right is right


def test_a_wrong_quantity_is_named_with_what_was_expected():
    reference = "You get 5 paid days of bereavement leave."
    check = check_answer("You get 27 days of paid leave after a 5-year break.", extract_facts(reference))
    assert not check.right
    assert check.missing == ["5 paid days"]
    assert check.wrong == ["27 days instead of 5 paid days"]
    assert check.summary() == "wrong: 27 days instead of 5 paid days"


def test_numbers_are_normalised_for_words_separators_and_case():
    assert normalise("Five days, 1,500 EUROS, 85%") == "5 days, 1500 euros, 85 percent"
    reference = extract_facts("You get 5 paid days and 1,500 euros.")
    assert check_answer("five paid days and 1500 euros", reference).right
    assert check_answer("5 days and 1 500 euros", reference).right is False  # a space is no thousands separator here
    assert check_answer("Contact it security", extract_facts("Contact IT Security now.")).right


def test_every_fact_must_be_stated():
    reference = extract_facts("Hotels are capped at 180 euros per night, or 250 euros in London.")
    assert [f.text for f in reference] == ["180 euros", "250 euros", "London"]
    assert check_answer("180 euros per night, 250 euros in London", reference).right
    partial = check_answer("Hotels are capped at 180 euros per night.", reference)
    assert not partial.right and partial.missing == ["250 euros", "London"]


def test_facts_stated_by_the_data_take_precedence():
    assert [f.text for f in stated_facts("250 euros; CareWell Gold")] == ["250 euros", "CareWell Gold"]
    assert [f.text for f in stated_facts(["27 days"])] == ["27 days"]
    assert stated_facts(None) is None and stated_facts("") is None
    record = {"facts": ["27 days"]}
    stated = key_facts(record, "Employees get 27 days and 3 weeks of sabbatical.", "", frozenset())
    assert [f.text for f in stated] == ["27 days"]
    assert check_answer("You get 27 days.", stated).right
    assert not check_answer("You get 28 days.", stated).right
    # a stated fact that is not a quantity must appear as written (case and spacing aside)
    assert check_answer("Ask the Service  desk team.", stated_facts("service desk")).right
    assert not check_answer("Ask IT.", stated_facts("service desk")).right


def test_a_name_in_most_references_is_the_subject_not_a_fact():
    references = [f"Lumora Systems pays {n} euros." for n in range(10)] + ["The ServiceDesk Portal handles it."]
    subject = subject_names(references)
    assert subject == frozenset({"lumora systems"})
    assert [f.text for f in extract_facts("Lumora Systems pays 5 euros.", "", subject)] == ["5 euros"]


def test_no_facts_means_no_verdict():
    check = check_answer("anything", [])
    assert check.right and check.summary() == "no key facts"
