"""VIN-sharded replicas through a leader's rolling restart while it hosts, and a resize 3 → 4.

Real ``hm-ingest run`` replicas (lease 4 s, heartbeat 1 s), a real mutual-TLS Mosquitto and the HM
emulator; a paced stream across 2,000 VINs runs from before the first event to after the last, and
every published message is accounted for in the Parquet output, phase by phase
(:mod:`ingest.testing.vin_scenarios`). Figures are printed (run with ``-s``).

* The leader r0 gets SIGTERM while it hosts the session of the SIGKILLed r1 (a rolling restart):
  it hands the session back to the broker, exits 0, and r2 leads and hosts r1 and r0 at once and
  after r0's lease; both restart and take their sessions back. Nothing lost, nothing twice.
* 3 → 4 members, r3 started after the rolling restart of r0..r2 with the new list, or before it
  (a StatefulSet scale-up): nothing lost, in any mixed state either; the end state has every VIN
  with its new owner only; nothing written twice, though moved VINs' messages reach two sessions
  while both subscribe (they claim them). Under MQTT 5 too, with half the stream V2 envelopes
  spread by VIN over every session.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest

from ingest.testing.broker import MosquittoBroker
from ingest.testing.certs import CertBundle
from ingest.testing.vin_scenarios import describe_phases, run_host_shutdown, run_resize
from tests.replica.vin_group import HEARTBEAT_S, LEASE_S, vin_group

pytestmark = pytest.mark.slow

VINS = 2_000
RATE = 500.0
# The paced stream publishes every 50 ms; a pause this long means the broker stalled it.
MAX_STREAM_GAP_S = 1.0


def test_a_leader_shut_down_while_hosting_hands_the_session_on_without_loss(
    broker: MosquittoBroker, certs: CertBundle, tmp_path: Path
) -> None:
    with vin_group(broker, certs, tmp_path) as group:
        report = run_host_shutdown(group, vins=VINS, rate=RATE)
    print(
        f"\n{report.vins} VINs, {report.published} messages; fleet ready in "
        f"{report.fleet_ready_s:.1f} s; r1 SIGKILL → r0 hosts it "
        f"{report.kill_to_r0_hosting_r1_s:.1f} s; r0 SIGTERM → r2 hosts r1 "
        f"{report.term_to_r2_hosting_r1_s:.1f} s, r0 exits "
        f"{report.term_to_r0_exit_s:.1f} s (code {report.r0_exit_code}), r2 hosts r0 "
        f"{report.term_to_r2_hosting_r0_s:.1f} s; restart → released "
        f"{ {k: round(v, 1) for k, v in report.restart_to_released_s.items()} }; largest stream "
        f"gap {report.largest_gap_s:.2f} s; {report.tally.describe()}\n"
        + describe_phases(report.phases)
    )

    assert report.tally.lost == 0, report.tally.describe()
    assert report.tally.duplicated == 0, report.tally.describe()
    assert all(phase.published > 0 for phase in report.phases), report.phases
    assert report.largest_gap_s < MAX_STREAM_GAP_S
    # The rolling restart of the leader is a clean exit that hands r1's session back.
    assert report.r0_exit_code == 0
    assert report.not_handed_back == ()
    assert report.leader_after_term == "r2"
    # r0 dropped its claim and resigned: r2 waits neither for the claim nor the leader lease to
    # expire, only for its next heartbeat (plus r0's release of what intake held).
    assert report.term_to_r2_hosting_r1_s < LEASE_S
    # r0's own session waits for r0's membership lease like any lost replica's.
    assert report.term_to_r2_hosting_r0_s < LEASE_S + 4 * HEARTBEAT_S + 5.0
    assert all(seconds < 30.0 for seconds in report.restart_to_released_s.values())
    assert report.still_hosted == {}
    assert report.subscription_problems == ()
    assert report.exit_codes == [0, 0, 0]


# r3 first is the order of a StatefulSet scale-up; r3 last is the bench's
# (python -m bench.replicas_bench --scenario resize), to keep CI shorter. Under MQTT 5 half the
# stream is V2 envelopes, which every session takes and keeps by its envelope rule: the new list
# reaches the sessions at different moments, and the rules' two steps must lose none. Under
# MQTT 3.1.1 the V2 topic is one more filter changing owner.
@pytest.mark.parametrize(("r3", "protocol"), [("first", "5"), ("first", "3.1.1")])
def test_growing_from_three_to_four_members_loses_nothing_and_moves_every_vin(
    broker: MosquittoBroker,
    certs: CertBundle,
    tmp_path: Path,
    r3: str,
    protocol: Literal["3.1.1", "5"],
) -> None:
    with vin_group(broker, certs, tmp_path, protocol) as group:
        report = run_resize(group, vins=VINS, rate=RATE, new_member_first=r3 == "first")
    print(
        f"\n{report.vins} VINs, {report.published} messages; fleet ready in "
        f"{report.fleet_ready_s:.1f} s; {report.moved_units} units move to r3; r3 {r3}; "
        f"(re)start → ready { {k: round(v, 1) for k, v in report.ready_s.items()} } (exit "
        f"codes {report.exit_codes}); settled {report.settle_s:.1f} s after the last; "
        f"written twice {report.duplicated} (of them moved "
        f"units' {report.duplicated_moved}; by writers {report.duplicated_by_writers}) of "
        f"{report.moved_messages_in_transition} moved units' messages in the transition; largest "
        f"stream gap {report.largest_gap_s:.2f} s; {report.tally.describe()}\n"
        + describe_phases(report.phases)
        + "\n"
        + "\n".join(snapshot.describe() for snapshot in report.snapshots)
    )

    assert report.tally.lost == 0, report.tally.describe()
    assert all(phase.lost == 0 for phase in report.phases), report.phases
    assert all(phase.published > 0 for phase in report.phases), report.phases
    assert report.largest_gap_s < MAX_STREAM_GAP_S
    # The end state: every VIN (and the V2 topic) with its owner among four, nothing hosted.
    assert report.subscription_problems == ()
    assert report.still_hosted == {}
    assert report.exit_codes == {"r0": 0, "r1": 0, "r2": 0}
    assert report.final_exit_codes == [0, 0, 0, 0]
    # A moved unit's messages published while two sessions subscribe it reach both; the first
    # to claim each writes it (ingest.replica.handover), so none is written twice.
    assert report.tally.duplicated == 0, (report.duplicated_by_writers, report.tally.describe())
    assert report.duplicated == 0
