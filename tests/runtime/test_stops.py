from lowbit.runtime.stops import StopMatcher


def stream(stops, pieces):
    """What a client sees: the deltas fed piece by piece, then the flush if no stop matched."""
    matcher, text, shown = StopMatcher(stops), "", []
    for piece in pieces:
        text += piece
        delta, stopped = matcher.feed(text)
        shown.append(delta)
        if stopped:
            return shown, True
    return shown + [matcher.flush(text)], False


def test_a_stop_spanning_pieces_shows_nothing_of_itself():
    shown, stopped = stream(["France is Paris"], ["The capital of", " France", " is", " Paris", ", the"])
    assert stopped and "".join(shown) == "The capital of "
    assert all("France" not in d for d in shown)


def test_a_partial_match_that_fails_is_released_in_order():
    shown, stopped = stream(["Paris, the"], ["The capital of France is", " Paris", ",", " a city"])
    assert not stopped and "".join(shown) == "The capital of France is Paris, a city"
    assert shown[1] == " " and shown[2] == ""  # "Paris" and "Paris," were held while they could begin the stop


def test_the_earliest_of_several_stops_wins():
    shown, stopped = stream(["lazy dog", "fox"], ["the quick brown f", "ox jumps over the lazy dog"])
    assert stopped and "".join(shown) == "the quick brown "


def test_a_stop_inside_one_piece():
    shown, stopped = stream(["\n\n"], ["Hello.\n\nNext"])
    assert stopped and shown == ["Hello."]


def test_no_stops_hold_nothing():
    shown, stopped = stream([], ["a", "b"])
    assert not stopped and shown == ["a", "b", ""]
