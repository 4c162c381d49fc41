"""Captioned JAX tasks (envs/captions.py): scripted episodes give the expected NetHack-style messages, the byte
table round-trips, ids survive auto-reset / jit / vmap / the rollout, and captions never read the reward."""
from collections import deque

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from envs import captions
from envs.messages import decode_messages
from jaxrl_pref.rollout import collect

try:
    import xminigrid  # noqa: F401
except ImportError:
    xminigrid = None
needs_grid = pytest.mark.skipif(xminigrid is None, reason="extra grid (xminigrid) not installed")

DOORKEY = "MiniGrid-DoorKey-5x5"
COLOURS = {1: "red", 2: "green", 3: "blue", 4: "purple", 5: "yellow", 6: "grey"}
FLOOR, WALL, BALL, GOAL, KEY, LOCKED, CLOSED, OPEN = 1, 2, 3, 6, 7, 8, 9, 10
FORWARD, RIGHT, LEFT, PICKUP, DROP, TOGGLE = range(6)


class NoPay:
    """Base-env wrapper that zeroes the reward (same transitions): captions must not change."""

    def __init__(self, env):
        self._env = env

    def __getattr__(self, item):
        return getattr(self._env, item)

    def step_env(self, key, state, action, params):
        obs, new, reward, terminated, info = self._env.step_env(key, state, action, params)
        return obs, new, jnp.zeros_like(reward), terminated, info


def _make(name, pay=True, num_envs=None, **kwargs):
    """As envs.make (AutoReset + EpisodeStats around the captioned base env), optionally never paying."""
    if pay:
        return envs.make(name, num_envs=num_envs, **kwargs)
    base, params = envs._base(name, kwargs)
    return envs.wrappers.EpisodeStats(envs.wrappers.AutoReset(captions.wrap(name, NoPay(base)), num_envs)), params


def test_tables_round_trip_and_registry():
    for name, size in (("KeyDoor-5", 7), ("KeyDoor-9", 7), (DOORKEY, 262), ("MiniGrid-LockedRoom", 262)):
        assert captions.is_captioned(name)
        tab = captions.caption_table(name)
        assert len(tab) == size and tab.texts[0] == "" and len(set(tab.texts)) == size
        assert tab.bytes.shape == (size, 256) and tab.bytes.dtype == np.uint8
        assert decode_messages(tab.bytes) == list(tab.texts)
        assert not tab.bytes[0].any()
        assert all(t.endswith((".", "!")) and len(t.encode("latin-1")) < 256 for t in tab.texts[1:])
    mg = captions.caption_table(DOORKEY)
    for text in ("You pick up a yellow key.", "You pick up an orange ball.", "You drop the blue ball.",
                 "You unlock the purple door.", "You reach the green goal square.", "It's a wall."):
        assert mg.texts[mg.id(text)] == text
    for name in ("CartPole-v1", "DeepSea-5", "SparseFourRooms-v0", "XLand-MiniGrid-R1-9x9"):
        assert not captions.is_captioned(name)
        with pytest.raises(ValueError, match="no captions"):
            captions.caption_table(name)
    # jit-side bytes of ids
    ids = jnp.array([[0, 1], [mg.id("You drop the blue ball."), 2]], jnp.int32)
    out = jax.jit(captions.message_bytes)(mg.device(), ids)
    chex.assert_shape(out, (2, 2, 256))
    chex.assert_type(out, jnp.uint8)
    assert decode_messages(np.asarray(out)) == [mg.texts[i] for i in np.asarray(ids).ravel()]


# -- KeyDoor ------------------------------------------------------------------------------------------------------

# KeyDoor-5 from the top-left corner: wall column 2, door (2, 2), key (4, 0), goal (0, 4); 0 up 1 right 2 down 3 left
KD_SCRIPT = [(0, "It's solid stone."), (1, ""), (1, "It's a wall."), (2, ""), (2, ""),
             (1, "This door is locked."), (3, ""), (3, "It's solid stone."), (2, ""), (2, "You pick up the key."),
             (0, ""), (0, ""), (1, ""), (1, "The door opens."), (1, ""), (0, ""), (1, ""),
             (0, "You reach the goal."), (2, "")]  # the last step belongs to the next episode


@pytest.mark.parametrize("pay", [True, False])
def test_keydoor_scripted_episode(pay):
    """Batched (2 identical envs: AutoReset's lax.cond reset path); the goal step keeps its message."""
    env, params = _make("KeyDoor-5", pay=pay, num_envs=2, random_start=False)
    tab = captions.caption_table("KeyDoor-5")
    actions = jnp.array([a for a, _ in KD_SCRIPT], jnp.int32)

    def run(key):
        obs, state = env.reset(key, params)

        def step(state, a):
            _, state, r, te, tr, info = env.step(key, state, jnp.full((2,), a), params)
            return state, (info["message_id"], r, te, info["episode_done"])
        return jax.lax.scan(step, state, actions)[1]

    ids, reward, term, done = jax.tree.map(np.asarray, jax.jit(run)(jax.random.PRNGKey(0)))
    assert ids.dtype == np.int32 and ids.shape == (len(KD_SCRIPT), 2)
    assert [tab.texts[i] for i in ids[:, 0]] == [t for _, t in KD_SCRIPT]
    np.testing.assert_array_equal(ids[:, 0], ids[:, 1])
    goal = len(KD_SCRIPT) - 2
    assert term[goal].all() and done[goal].all() and not term[:goal].any()
    assert reward[goal, 0] == (1.0 if pay else 0.0)  # the message is the same either way


def test_keydoor_slip_captions_the_move_made():
    """slip_prob=1: every move is random; a blocked move (and only one) gets a bump message, whatever was chosen."""
    env, params = envs.make("KeyDoor-5", num_envs=16, slip_prob=1.0, max_steps_in_episode=1000)
    tab = captions.caption_table("KeyDoor-5")
    bumps = [tab.id(t) for t in ("It's solid stone.", "It's a wall.", "This door is locked.")]

    def run(key):
        obs, state = env.reset(key, params)

        def step(carry, k):
            obs, state = carry
            nobs, state, r, te, tr, info = env.step(k, state, jnp.zeros(16, jnp.int32), params)
            return (nobs, state), (obs, info["final_obs"], info["message_id"])
        return jax.lax.scan(step, (obs, state), jax.random.split(key, 60))[1]

    before, after, ids = jax.tree.map(np.asarray, jax.jit(run)(jax.random.PRNGKey(3)))
    blocked = before[..., :25].argmax(-1) == after[..., :25].argmax(-1)
    np.testing.assert_array_equal(blocked, np.isin(ids, bumps))
    assert blocked.any() and (~blocked).any() and (ids == tab.id("You pick up the key.")).any()


# -- xminigrid DoorKey --------------------------------------------------------------------------------------------

class Driver:
    """Steps one unbatched env on the host (jitted step), recording (action, message text) pairs."""

    def __init__(self, env, params, state):
        self.state = state
        self.step = jax.jit(lambda s, a: env.step(jax.random.PRNGKey(0), s, a, params))
        self.tab = captions.caption_table(DOORKEY)
        self.log, self.rewards, self.terminated = [], [], []

    @property
    def ts(self):
        return self.state.env_state.state

    def act(self, a: int) -> str:
        _, self.state, r, te, tr, info = self.step(self.state, jnp.int32(a))
        self.log.append((a, int(info["message_id"])))
        self.rewards.append(float(r))
        self.terminated.append(bool(te))
        return self.tab.texts[int(info["message_id"])]

    def face(self, d: int):
        turns = {0: [], 1: [RIGHT], 2: [RIGHT, RIGHT], 3: [LEFT]}[(d - int(self.ts.agent.direction)) % 4]
        for a in turns:
            assert self.act(a) == ""  # turning says nothing

    def goto(self, cell):
        """Walks a shortest path over walkable cells to ``cell``; every step onto floor says nothing."""
        grid = np.asarray(self.ts.grid)
        start = tuple(int(x) for x in self.ts.agent.position)
        prev, todo = {start: None}, deque([start])
        while todo:
            c = todo.popleft()
            for d, (dy, dx) in enumerate(((-1, 0), (0, 1), (1, 0), (0, -1))):
                n = (c[0] + dy, c[1] + dx)
                if n not in prev and grid[n][0] in (FLOOR, GOAL, OPEN):
                    prev[n] = (c, d)
                    todo.append(n)
        assert tuple(cell) in prev, f"{cell} unreachable from {start}"
        path, c = [], tuple(cell)
        while prev[c] is not None:
            c, d = prev[c]
            path.append(d)
        for d in reversed(path):
            self.face(d)
            assert self.act(FORWARD) == ""


def _doorkey_layout(reset):
    """A seed whose agent reaches the cell left of the door without passing the key: (state, agent row, key row,
    door row). DoorKey-5x5: wall column 2, left room column 1, goal (3, 3)."""
    for seed in range(64):
        obs, state = reset(jax.random.PRNGKey(seed))
        grid = np.asarray(state.env_state.state.grid)
        door = int(np.argwhere(grid[:, 2, 0] == LOCKED)[0, 0])
        key = int(np.argwhere(grid[:, 1, 0] == KEY)[0, 0])
        agent = int(state.env_state.state.agent.position[0])
        if not min(agent, door) <= key <= max(agent, door):
            return state, agent, key, door
    raise AssertionError("no suitable DoorKey-5x5 layout in 64 seeds")


@needs_grid
def test_minigrid_doorkey_scripted_episode():
    env, params = envs.make(DOORKEY)
    reset = jax.jit(lambda k: env.reset(k, params))
    state, agent, key, door = _doorkey_layout(reset)
    colour = COLOURS[int(np.asarray(state.env_state.state.grid)[key, 1, 1])]  # DoorKey's key is yellow
    door_colour = COLOURS[int(np.asarray(state.env_state.state.grid)[door, 2, 1])]
    dr = Driver(env, params, state)

    dr.goto((door, 1))
    dr.face(1)
    assert dr.act(FORWARD) == "This door is locked."
    assert dr.act(TOGGLE) == "This door is locked."  # no key
    assert dr.act(PICKUP) == "There is nothing here to pick up."
    assert dr.act(DROP) == "You don't have anything to drop."
    dr.face(3)
    assert dr.act(FORWARD) == "It's a wall."
    assert dr.act(TOGGLE) == "You see no door there."

    side = key - 1 if agent < key else key + 1
    dr.goto((side, 1))
    dr.face(2 if side < key else 0)
    assert dr.act(FORWARD) == f"There is a {colour} key in your way."
    assert dr.act(PICKUP) == f"You pick up a {colour} key."
    assert dr.act(PICKUP) == "There is nothing here to pick up."  # the key's cell is floor now
    assert dr.act(DROP) == f"You drop the {colour} key."
    assert dr.act(PICKUP) == f"You pick up a {colour} key."
    dr.face(3)
    assert dr.act(DROP) == "There is no room to drop that here."  # facing the outer wall

    # synthetic fronts, reusing the compiled step: a red ball while the hands are full; a purple locked door
    held, n = dr.state, len(dr.log)
    front = np.asarray(dr.ts.agent.position) + np.array([0, -1])
    for tile, a, expect in (((BALL, 1), PICKUP, "Your hands are full."),
                            ((BALL, 1), FORWARD, "There is a red ball in your way."),
                            ((LOCKED, 4), TOGGLE, "This door is locked."),  # the yellow key does not fit
                            ((CLOSED, 3), FORWARD, "The door is closed."),
                            ((CLOSED, 3), TOGGLE, "The blue door opens.")):
        grid = dr.ts.grid.at[front[0], front[1]].set(jnp.array(tile, dr.ts.grid.dtype))
        dr.state = held.replace(env_state=held.env_state.replace(state=held.env_state.state.replace(grid=grid)))
        assert dr.act(a) == expect
    dr.state = held
    del dr.log[n:], dr.rewards[n:], dr.terminated[n:]  # the replay below leaves the synthetic steps out

    dr.goto((door, 1))
    dr.face(1)
    assert dr.act(TOGGLE) == f"You unlock the {door_colour} door."
    assert dr.act(TOGGLE) == f"The {door_colour} door closes."
    assert dr.act(TOGGLE) == f"The {door_colour} door opens."
    assert dr.act(FORWARD) == f"You step into the {door_colour} doorway."
    assert not any(dr.terminated)
    dr.goto((door, 3))  # the right room's column; the goal is (3, 3)
    dr.face(2)
    for _ in range(3 - door - 1):
        assert dr.act(FORWARD) == ""
    assert dr.act(FORWARD) == "You reach the green goal square."
    assert dr.terminated[-1] and dr.rewards[-1] > 0  # the message of the step that ended the episode

    # same actions on an env that never pays: the same messages
    env0, _ = _make(DOORKEY, pay=False)
    dr0 = Driver(env0, params, state)
    for a, _ in dr.log:
        dr0.act(a)
    assert dr0.log == dr.log and dr0.terminated[-1] and max(dr0.rewards) == 0.0


@needs_grid
@pytest.mark.slow  # longer than the default suite affords; CI's slow pass or nightly: tests/conftest.py
def test_minigrid_jit_vmap_rollout():
    """vmap over seeds of a batched env through rollout.collect: ids [seeds, T, N] int32 in the rollout's info,
    decodable in jit, with auto-resets inside the rollout."""
    n, t = 4, 96
    env, params = envs.make(DOORKEY, num_envs=n, max_steps=16)
    tab = captions.caption_table(DOORKEY)
    table = tab.device()
    num_actions = env.action_space(params).n

    def policy(obs, key):
        a = jax.random.randint(key, (n,), 0, num_actions)
        return a, jnp.zeros(n), jnp.zeros(n)

    def run(key):
        obs, state = env.reset(key, params)
        _, _, traj = collect(env, params, policy, state, obs, key, t)
        return traj.info, captions.message_bytes(table, traj.info["message_id"])

    info, msg = jax.jit(jax.vmap(run))(jax.random.split(jax.random.PRNGKey(1), 2))
    chex.assert_shape(info["message_id"], (2, t, n))
    chex.assert_type(info["message_id"], jnp.int32)
    chex.assert_shape(msg, (2, t, n, 256))
    ids = np.asarray(info["message_id"])
    assert ids.min() >= 0 and ids.max() < len(tab) and len(np.unique(ids)) >= 4
    assert decode_messages(np.asarray(msg)) == [tab.texts[i] for i in ids.ravel()]
    assert np.asarray(info["episode_done"]).any()  # auto-resets happened inside the rollout
    # the two seeds differ: ids are per env, not shared or averaged
    assert (ids[0] != ids[1]).any()


# -- Craftax ------------------------------------------------------------------------------------------------------

CX = "Craftax-Classic-Symbolic-v1"


def test_craftax_caption_tables_and_prompt():
    """One table per game (Symbolic and Pixels share it): unique texts, "" first, a caption per achievement at id
    index + 1 (derived from the enum names), then health, items, food/drink, stats; the goal-only prompt."""
    pytest.importorskip("craftax")
    from craftax.craftax.constants import Achievement as FullAchievement
    from craftax.craftax_classic.constants import Achievement
    from jaxrl_pref.annotation.backends import Prompt, task_for_env
    tab = captions.caption_table(CX)
    assert captions.caption_table("Craftax-Classic-Pixels-v1") is tab and captions.is_captioned("Craftax-Pixels-v1")
    assert len(tab) == 42 == len(set(tab.texts)) and tab.texts[0] == ""
    assert decode_messages(tab.bytes) == list(tab.texts)
    assert [tab.texts[a.value + 1] for a in (Achievement.COLLECT_WOOD, Achievement.PLACE_TABLE,
                                             Achievement.MAKE_WOOD_PICKAXE, Achievement.DEFEAT_ZOMBIE,
                                             Achievement.COLLECT_DIAMOND, Achievement.EAT_COW)] == [
        "You collect wood.", "You place a crafting table.", "You make a wood pickaxe.", "You defeat a zombie.",
        "You collect a diamond.", "You eat a cow."]
    assert all(t.startswith("You ") and t.endswith(".") for t in tab.texts[1:])
    k = len(Achievement) + 1  # after the achievements: health, then the items
    assert tab.texts[k:k + 3] == ("You die.", "You are hurt.", "You now have more wood.")
    full = captions.caption_table("Craftax-Symbolic-v1")
    assert len(set(full.texts)) == len(full) > len(FullAchievement) + 1 and full.texts[0] == ""
    assert full.texts[FullAchievement.DEFEAT_ORC_SOLIDER.value + 1] == "You defeat an orc soldier."
    assert full.texts[FullAchievement.ENTER_GNOMISH_MINES.value + 1] == "You enter the gnomish mines."
    assert set(tab.texts) - set(full.texts) == {f"You now have more {m} {t}s." for m in ("wood", "stone", "iron")
                                                for t in ("pickaxe", "sword")}
    # the annotator's prompt: the game's goal, no caption listed as good or bad
    assert {task_for_env(n) for n in envs._craftax.NAMES} == {"craftax"}
    p = Prompt.load("craftax")
    assert p.goal and "achievements" in p.sections["description"] and not p.progress and not p.neutral
    assert not set(p.goal) & (set(tab.texts) | set(full.texts))
    assert '"You collect wood."' in p.label_messages("You collect wood.")[1]["content"]


def test_craftax_oni_and_motif_parse():
    """ONI, Motif and ELLM accept a captioned Craftax task (the jitted-loop path) and pick the Craftax prompt."""
    from experiments import oni
    for name in ("Craftax-Classic-Symbolic-v1", "Craftax-Classic-Pixels-v1", "Craftax-Symbolic-v1"):
        assert captions.is_captioned(name)
        for method in ("oni", "motif", "ellm"):
            opts = oni.parse(["--env", name, "--method", method])
            assert opts.env_name == name and not opts.host and opts.annotator.task(name) == "craftax"


@pytest.fixture(scope="module")
def craftax_start():
    """A Classic world (jitted reset of the captioned base env) and its jitted caption function."""
    pytest.importorskip("craftax")
    base, params = envs._base(CX, {})
    env = captions.wrap(CX, base)
    _, state = jax.jit(env.reset_env)(jax.random.PRNGKey(0), params)
    caption = jax.jit(lambda s, n: env._caption(base, None, s, jnp.int32(0), n, params))
    return state, caption


def test_craftax_scripted_transitions(craftax_start):
    """Edited copies of a real state: each tier's caption and the priority achievement > health > item > food/drink
    > stat at 0; several in a tier: the first by index; losses, repeats and gains in health say nothing."""
    state, caption = craftax_start
    tab = captions.caption_table(CX)
    s = state.env
    assert s.player_health == 9 and s.player_food == 9 and not s.achievements.any()

    def after(ach=(), inv=None, **fields):
        a = s.achievements.at[jnp.asarray(ach, jnp.int32)].set(True) if ach else s.achievements
        return s.replace(achievements=a, inventory=s.inventory.replace(**(inv or {})), **fields)

    def says(new, old=s):
        return tab.texts[int(caption(state.replace(env=old), state.replace(env=new)))]

    wood, table, pickaxe, zombie = 0, 1, 5, 8  # craftax_classic Achievement values
    assert says(s) == ""
    assert says(after([wood], {"wood": 1})) == "You collect wood."  # the achievement, not the item
    assert says(after([pickaxe, table])) == "You place a crafting table."  # the lowest index
    assert says(after([zombie], player_health=s.player_health - 2)) == "You defeat a zombie."
    assert says(after(player_health=s.player_health - 1, inv={"sapling": 1})) == "You are hurt."
    assert says(after(player_health=jnp.zeros_like(s.player_health))) == "You die."
    assert says(after(player_health=s.player_health + 1)) == ""
    assert says(after(inv={"wood": 1})) == "You now have more wood."  # no achievement: the item
    assert says(after(inv={"sapling": 1, "wood_pickaxe": 1}, player_food=s.player_food + 1)) == \
        "You now have more saplings."
    assert says(after(inv={"iron_sword": 2})) == "You now have more iron swords."
    assert says(after(inv={"wood": 3}), after(inv={"wood": 4})) == ""  # spent on crafting
    got = after([wood])  # the achievement is had before and after: a repeat says what else changed
    assert says(after([wood], {"wood": 1}), got) == "You now have more wood."
    assert says(after(player_food=s.player_food + 1, player_drink=s.player_drink + 1)) == "You feel less hungry."
    assert says(after(player_drink=s.player_drink + 1, player_energy=0)) == "You feel less thirsty."
    low = after(player_food=1, player_drink=1, player_energy=1)
    assert says(low.replace(player_drink=0, player_energy=0), low) == "You are very thirsty."
    assert says(low.replace(player_energy=0), low) == "You are very tired."
    assert says(low.replace(player_food=0), low) == "You are very hungry."
    assert says(after(player_food=0), after(player_food=0)) == ""  # stays at 0: said once


@pytest.mark.slow  # compiling the batched Classic step takes ~40 s on 2 cores
def test_craftax_rollout_ids_survive_auto_reset():
    """4 envs through envs.make (CraftaxAutoReset) in one jitted scan: env 0 is set to die and env 1 to run out
    of time (and food) on the first step, whose messages survive the reset; then random play."""
    pytest.importorskip("craftax")
    n, t = 4, 160
    env, params = envs.make(CX, num_envs=n)
    tab = captions.caption_table(CX)
    die, hungry = tab.id("You die."), tab.id("You are very hungry.")

    def run(key):
        _, state = env.reset(key, params)
        s = state.env_state.env
        s = s.replace(player_health=s.player_health.at[0].set(1),  # env 0: starving, one step from losing health
                      player_recover=s.player_recover.at[0].set(-15.0),
                      player_food=s.player_food.at[0].set(0).at[1].set(1),  # env 1: one step from food 0...
                      player_hunger=s.player_hunger.at[1].set(25.0),
                      timestep=s.timestep.at[1].set(params.max_timesteps - 1))  # ... and from its time limit
        state = state.replace(env_state=state.env_state.replace(env=s))

        def step(state, k):
            ka, ks = jax.random.split(k)
            a = jax.random.randint(ka, (n,), 0, env.action_space(params).n) * (state.episode_length > 0)
            _, state, _, te, tr, info = env.step(ks, state, a, params)
            return state, (info["message_id"], te, tr, state.env_state.env.timestep)
        return jax.lax.scan(step, state, jax.random.split(key, t))[1]

    ids, term, trunc, clock = jax.tree.map(np.asarray, jax.jit(run)(jax.random.PRNGKey(2)))
    assert ids.dtype == np.int32 and ids.shape == (t, n) and ids.min() >= 0 and ids.max() < len(tab)
    assert ids[0, 0] == die and term[0, 0] and ids[0, 1] == hungry and trunc[0, 1] and not term[0, 1]
    assert (clock[0, :2] == 0).all() and (clock[0, 2:] == 1).all()  # envs 0 and 1 restarted after their message
    assert len(np.unique(ids[1:])) >= 3  # random play says things too
    # Classic ends an episode only by death (lava cannot be entered): health fell on that step
    assert np.isin(ids[term], [die, *range(1, 23)]).all()  # (1-22: an achievement on that step)


@pytest.mark.slow  # generating a full Craftax world compiles for ~30 s on 2 cores
def test_full_craftax_scripted_transitions():
    """Full Craftax shares the rules: float health, armour and potions are arrays (summed), levels of tools."""
    pytest.importorskip("craftax")
    from craftax.craftax.constants import Achievement
    name = "Craftax-Symbolic-v1"
    base, params = envs._base(name, {})
    env = captions.wrap(name, base)
    _, state = jax.jit(env.reset_env)(jax.random.PRNGKey(0), params)
    caption = jax.jit(lambda s, n: env._caption(base, None, s, jnp.int32(0), n, params))
    tab = captions.caption_table(name)
    s, inv = state.env, state.env.inventory

    def says(**fields):
        return tab.texts[int(caption(state, state.replace(env=s.replace(**fields))))]

    assert says() == ""
    assert says(achievements=s.achievements.at[Achievement.DEFEAT_KNIGHT.value].set(True)) == "You defeat a knight."
    assert says(player_health=s.player_health - 0.5) == "You are hurt."
    assert says(inventory=inv.replace(armour=inv.armour.at[2].set(1))) == "You now have better armour."
    assert says(inventory=inv.replace(potions=inv.potions.at[3].add(1), arrows=inv.arrows + 2)) == \
        "You now have more arrows."  # the first field in Inventory's order
    assert says(inventory=inv.replace(potions=inv.potions.at[3].add(1))) == "You now have more potions."
